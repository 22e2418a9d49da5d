"""The shared bootstrap: error mapping for unary and streaming handlers, health through the lifecycle."""

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from fabric.server import serve
from fabric.settings import ServiceSettings
from tests.support.echo import FAILURES, SERVICE, EchoService


@pytest.fixture
async def running():
    service, stop = EchoService(), asyncio.Event()
    settings = ServiceSettings(port=0, grace_s=1)
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(service, settings, on_ready=ready.set_result, stop=stop))
    yield service, stop, ready, task
    stop.set()
    service.warm.set()
    await asyncio.wait_for(task, 10)


async def _serving(service, ready):
    service.warm.set()
    return await asyncio.wait_for(ready, 10)


async def test_errors_map_to_status_codes_for_every_kind_of_method(running):
    service, _, ready, _ = running
    port = await _serving(service, ready)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        stream = channel.unary_stream(f"/{SERVICE}/Stream")
        assert await unary(b"hi", timeout=5) == b"hi"
        expected = {
            "invalid": grpc.StatusCode.INVALID_ARGUMENT,
            "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
            "down": grpc.StatusCode.UNAVAILABLE,
            "bug": grpc.StatusCode.INTERNAL,
        }
        for name, code in expected.items():
            with pytest.raises(grpc.aio.AioRpcError) as unary_error:
                await unary(name.encode(), timeout=5)
            assert unary_error.value.code() == code
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as stream_error:
                async for item in stream(name.encode(), timeout=5):
                    received.append(item)
            assert stream_error.value.code() == code and received == [b"first"]
            # client-streaming and bidirectional handlers map the same way
            with pytest.raises(grpc.aio.AioRpcError) as gather_error:
                await channel.stream_unary(f"/{SERVICE}/Gather")(iter([b"ok", name.encode()]), timeout=5)
            assert gather_error.value.code() == code
            with pytest.raises(grpc.aio.AioRpcError) as bidi_error:
                async for _ in channel.stream_stream(f"/{SERVICE}/Bidi")(iter([name.encode()]), timeout=5):
                    pass
            assert bidi_error.value.code() == code

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(b"invalid", timeout=5)
        assert info.value.details() == "texts[2]: text is empty"
        status = rpc_status.from_call(info.value)
        violation = error_details_pb2.BadRequest()
        status.details[0].Unpack(violation)
        assert violation.field_violations[0].field == "texts[2]"

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(b"overloaded", timeout=5)
        retry = error_details_pb2.RetryInfo()
        rpc_status.from_call(info.value).details[0].Unpack(retry)
        assert retry.retry_delay.ToMilliseconds() == 2500


async def test_health_is_not_serving_until_warm_and_after_stop(running):
    service, stop, ready, task = running
    assert not ready.done(), "on_ready must wait for the warm-up"
    port = await _serving(service, ready)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stop.set()
        await asyncio.wait_for(task, 10)
    assert service.closed


async def test_health_watch_streams_through_the_interceptor(running):
    """grpc's Health/Watch writes with context.write (a coroutine, not an iterator): the interceptor must pass
    it, or every watcher (the router's replica health) gets INTERNAL."""
    service, stop, ready, task = running
    port = await _serving(service, ready)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stop.set()  # shutting down: the watcher hears NOT_SERVING
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        await asyncio.wait_for(task, 10)


async def test_not_serving_while_warming_up(unused_tcp_port):
    service, stop = EchoService(), asyncio.Event()
    settings = ServiceSettings(port=unused_tcp_port, grace_s=1)
    task = asyncio.create_task(serve(service, settings, stop=stop))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await channel.channel_ready()
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            service.warm.set()
            for _ in range(50):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.02)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop.set()
        service.warm.set()
        await asyncio.wait_for(task, 10)
