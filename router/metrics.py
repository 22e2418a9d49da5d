"""The router's own series (request counts and latencies come from the shared server metrics)."""

from prometheus_client import Counter, Histogram

from fabric.metrics import LATENCY_BUCKETS

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
STAGE_SECONDS = Histogram(
    "ragloom_router_stage_seconds", "Time in each stage of a request: embedding (the query), retrieval (all shards), "
    "rerank (the candidates), reread (the best sentences, by the generator's model), generation (first token to "
    "last)", ["stage"], buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "ragloom_router_time_to_first_token_seconds", "From the start of an ask to the first answer text sent (verified), as users feel it",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60),
)
VERIFIED_SENTENCES = Counter(
    "ragloom_router_answer_sentences", "Generated answer sentences checked against the evidence, by outcome: kept or dropped",
    ["outcome"],
)
ABSTENTIONS = Counter(
    "ragloom_router_abstentions", "Asks answered 'the documents do not answer this' because the evidence was weak"
)

STALE_READS = Counter(
    "ragloom_router_stale_reads",
    "Shard reads answered without this router's own last write because no replica had applied it in time",
    ["shard"],
)
DEGRADED = Counter(
    "ragloom_router_degraded_total",
    "Stages done in a simpler way because a dependency failed (retrieval: BM25 only; rerank: skipped; "
    "verification and attribution: by words only)",
    ["stage"],
)
