"""Prometheus metrics: the HTTP endpoint every service can expose and the series of the shared interceptor."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)


def serve_metrics(host: str, port: int) -> None:
    """Serves /metrics on `port` from a background thread (0 = off)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)


# Every service's RPCs, recorded by the shared server interceptor.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
GRPC_HANDLED = Counter(
    "ragloom_grpc_server_handled", "RPCs completed, by service, method and gRPC status code", ["service", "method", "code"]
)
GRPC_LATENCY = Histogram(
    "ragloom_grpc_server_handling_seconds", "RPC duration (a stream: until its last message), by service and method",
    ["service", "method"], buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge("ragloom_grpc_server_in_flight", "RPCs being handled now, by service", ["service"])
