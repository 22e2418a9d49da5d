"""The router's own series (request counts and latencies come from the shared server metrics)."""

from prometheus_client import Counter

DOWNSTREAM_CALLS = Counter(
    "ragloom_router_downstream_calls", "Calls the router made to other services, by service", ["service"]
)
CACHE_LOOKUPS = Counter(
    "ragloom_router_cache_lookups", "Cache lookups by result: hit, miss, error (unreachable: served uncached), bypass",
    ["result"],
)
SINGLE_FLIGHT_SHARED = Counter(
    "ragloom_router_single_flight_shared", "Requests that joined an identical request already under way"
)
PARTIAL_RESULTS = Counter(
    "ragloom_router_partial_results", "Retrievals answered without every shard, by shard that failed", ["shard"]
)
