"""Tracing and structured logs for every service.

Tracing is on only when an OTLP endpoint is configured: then each service exports its spans
(batched, head-sampled), callers put the W3C trace context in each call's metadata and the
server's call interceptor continues it, so one question is one trace across every hop. Off, nothing is installed and the
OpenTelemetry API stays a no-op.
"""

from __future__ import annotations

import json
import logging
import time

from contextlib import contextmanager, nullcontext

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

_provider = None


def setup_tracing(service: str, otlp_endpoint: str = "", exporter=None, sample_ratio: float = 1.0):
    """Installs a tracer provider exporting to `otlp_endpoint` (or to `exporter`); returns it, or None when off.

    Head sampling: a trace is kept with probability `sample_ratio`, decided where it starts (the
    router) and followed by every service it reaches, so a kept question is always a whole trace."""
    global _provider
    if not otlp_endpoint and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=not otlp_endpoint.startswith("https"))
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"ragloom-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()  # flushes spans still batched


def enabled() -> bool:
    return _provider is not None


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (W3C traceparent), for a call to another service.

    Callers add it explicitly: cheaper than gRPC client interceptors, which wrap every call
    whether or not it is traced."""
    if _provider is None:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


@contextmanager
def _carry(parent_context):
    """Makes an unsampled caller's context current without a span: calls onward still say "not sampled"."""
    token = otel_context.attach(parent_context)
    try:
        yield trace.INVALID_SPAN
    finally:
        otel_context.detach(token)


def server_span(service: str, method: str, invocation_metadata):
    """A SERVER span for an incoming call, child of the caller's span when its metadata carries one.

    When the caller's trace is not sampled no span is made at all: a sampled-out request costs
    one header parse per hop."""
    parent = propagate.extract({k: v for k, v in (invocation_metadata or ()) if isinstance(v, str)})
    caller = trace.get_current_span(parent).get_span_context()
    if caller.is_valid and not caller.trace_flags.sampled:
        return _carry(parent)
    return trace.get_tracer("ragloom.grpc").start_as_current_span(
        method.lstrip("/"), context=parent, kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": method.rsplit("/", 2)[-2] if method.count("/") >= 2 else "",
                    "rpc.method": method.rsplit("/", 1)[-1], "ragloom.service": service},
    )


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def span(tracer_: trace.Tracer, name: str, **attributes):
    """A child span of the current one — or nothing, cheaply, when the current trace is not recorded."""
    if _provider is None or not trace.get_current_span().is_recording():
        return nullcontext(trace.INVALID_SPAN)
    return tracer_.start_as_current_span(name, attributes=attributes or None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the trace and span ids of the call being served."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str = "json") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
