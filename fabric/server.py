"""One server lifecycle for every service.

grpc.aio server with the error interceptor and size/keepalive options → standard
health (NOT_SERVING until warm) and reflection → start → warm the service → SERVING
→ wait for SIGTERM/SIGINT → NOT_SERVING → graceful stop → close the service.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from fabric.errors import to_status
from fabric.handlers import HandlerCache, rewrap
from fabric.metrics import GRPC_HANDLED, GRPC_IN_FLIGHT, GRPC_LATENCY, serve_metrics
from opentelemetry.trace import Status, StatusCode

from fabric import telemetry
from fabric.telemetry import setup_tracing, shutdown_tracing
from fabric.tls import IdentityInterceptor
from fabric.settings import ServiceSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Service(Protocol):
    """What the bootstrap needs from a service."""

    #: Short name used in logs and error messages, e.g. "indexer".
    name: str
    #: Fully qualified gRPC service names it implements (for health and reflection).
    service_names: list[str]

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the servicers to the server."""

    async def start(self) -> None:
        """Loads models / data. Health says NOT_SERVING until this returns."""

    async def close(self) -> None:
        """Releases resources after the server has stopped."""

    # Optional: `bind_health(report)`, called before `start`, hands the service an async
    # `report(serving: bool)` that sets its health while it runs.


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    size = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class CallInterceptor(grpc.aio.ServerInterceptor):
    """The one place calls are observed and errors become statuses, for unary and streaming handlers:
    every exception maps to a status code (fabric.errors), every call is counted by method and code,
    timed and tracked while in flight, and, with tracing on, runs in a SERVER span continuing the
    caller's trace (W3C traceparent metadata)."""

    def __init__(self, service: str):
        self.service = service
        self.in_flight = GRPC_IN_FLIGHT.labels(service)
        # Per call, only what must be: the wrapped handlers and the metric series are made once per method.
        self._handlers = HandlerCache(lambda handler, method: rewrap(
            handler, lambda b: self._wrap_unary(b, method), lambda b: self._wrap_stream(b, method)))
        self._series: dict[str, _Series] = {}

    async def intercept_service(self, continuation, handler_call_details):
        return self._handlers.get(handler_call_details.method, await continuation(handler_call_details))

    def series(self, method: str) -> "_Series":
        found = self._series.get(method)
        if found is None:
            found = self._series[method] = _Series(self.service, method.rsplit("/", 1)[-1])
        return found

    def _wrap_unary(self, behavior, method: str):
        series = self.series(method)

        async def wrapped(request, context):
            if telemetry.enabled():
                with telemetry.server_span(self.service, method, context.invocation_metadata()) as span:
                    return await observed(request, context, span)
            return await observed(request, context, None)

        async def observed(request, context, span):
            call = _Observed(self.in_flight, series, context, span)
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                call.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place errors become statuses
                status = self._status(method, exc)
                call.code = status.code
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                call.done()

        return wrapped

    def _wrap_stream(self, behavior, method: str):
        series = self.series(method)

        async def wrapped(request, context):
            if telemetry.enabled():
                with telemetry.server_span(self.service, method, context.invocation_metadata()) as span:
                    async for response in observed(request, context, span):
                        yield response
            else:
                async for response in observed(request, context, None):
                    yield response

        async def observed(request, context, span):
            call = _Observed(self.in_flight, series, context, span)
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):  # a handler that streams with context.write (grpc's Health/Watch)
                    await result
                    return
                async for response in result:
                    yield response
            except grpc.aio.AbortError:
                raise
            except (asyncio.CancelledError, GeneratorExit):
                call.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001
                status = self._status(method, exc)
                call.code = status.code
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                call.done()

        return wrapped

    def _status(self, method: str, exc: Exception) -> grpc.Status:
        status = to_status(exc, self.service)
        if status.code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=exc)
        else:
            log.info("%s -> %s: %s", method, status.code.name, status.details)
        return status


class _Series:
    """One method's metric series (prometheus_client's `labels()` looks them up under a lock each time)."""

    def __init__(self, service: str, method: str):
        self.latency = GRPC_LATENCY.labels(service, method)
        self._handled: dict[grpc.StatusCode, object] = {}
        self._service, self._method = service, method

    def handled(self, code: grpc.StatusCode):
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = GRPC_HANDLED.labels(self._service, self._method, code.name)
        return counter


class _Observed:
    """One call's metrics: in flight from creation, counted and timed at done()."""

    __slots__ = ("in_flight", "series", "context", "span", "code", "start")

    def __init__(self, in_flight, series: _Series, context, span=None):
        self.in_flight, self.series, self.context, self.span = in_flight, series, context, span
        self.code: grpc.StatusCode | None = None
        self.start = time.perf_counter()
        in_flight.inc()

    def done(self) -> None:
        self.in_flight.dec()
        code = self.code or _context_code(self.context) or grpc.StatusCode.OK
        self.series.handled(code).inc()
        self.series.latency.observe(time.perf_counter() - self.start)
        if self.span is not None and self.span.is_recording():
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                self.span.set_status(Status(StatusCode.ERROR, code.name))


def _context_code(context) -> grpc.StatusCode | None:
    """The code a handler set itself (context.abort / set_code), if any."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpcio without ServicerContext.code()
        return None
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return code


async def serve(
    service: Service,
    settings: ServiceSettings,
    *,
    on_ready: Callable[[int], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Runs `service` until SIGTERM/SIGINT (or `stop` is set), then shuts it down gracefully."""
    setup_tracing(service.name, settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
    identity = settings.identity
    interceptors: list[grpc.aio.ServerInterceptor] = [CallInterceptor(service.name)]
    if identity is not None:
        interceptors.append(IdentityInterceptor(settings.allowed_callers))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", *service.service_names):
        await health.set(name, NOT_SERVING)
    service.register(server)
    reflection.enable_server_reflection(
        [*service.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    if identity is not None:
        port = server.add_secure_port(settings.address, identity.server_credentials())
    else:
        port = server.add_insecure_port(settings.address)
    if port == 0:
        raise OSError(f"{service.name}: cannot listen on {settings.address}")
    serve_metrics(settings.host, settings.metrics_port)
    await server.start()
    log.info("%s listening on %s:%d (%s, warming up)", service.name, settings.host, port,
             "mutual TLS" if identity else "plaintext")

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    bind_health = getattr(service, "bind_health", None)
    if bind_health is not None:  # a service whose health can change while it runs (a shard stuck applying)
        async def report(serving: bool) -> None:
            if not stop.is_set():
                for name in ("", *service.service_names):
                    await health.set(name, SERVING if serving else NOT_SERVING)

        bind_health(report)
    try:
        warm = asyncio.ensure_future(service.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({warm, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if warm.done():
            warm.result()  # a failed warm-up ends the process with its error
            for name in ("", *service.service_names):
                await health.set(name, SERVING)
            log.info("%s serving on %s:%d", service.name, settings.host, port)
            if on_ready is not None:
                result = on_ready(port)
                if asyncio.iscoroutine(result):
                    await result
            await stopped
        else:
            warm.cancel()
        log.info("%s shutting down (grace %.1fs)", service.name, settings.grace_s)
    finally:
        await health.enter_graceful_shutdown()
        await server.stop(settings.grace_s)
        await service.close()
        shutdown_tracing()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        log.info("%s stopped", service.name)
