"""Prometheus metrics: the HTTP endpoint every service can expose, and helpers to read them in tests."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, start_http_server

log = logging.getLogger(__name__)


def serve_metrics(host: str, port: int) -> None:
    """Serves /metrics on `port` from a background thread (0 = off)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)


def sample(name: str, **labels: str) -> float:
    """Current value of one series in this process (0 when it has not been touched)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
