"""Mutual TLS with SPIFFE identities: no certificate, no call; the wrong identity, PERMISSION_DENIED."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabric.client import channel
from fabric.server import serve
from fabric.settings import ServiceSettings
from fabric.tls import LocalCA, spiffe_id
from tests.support.echo import SERVICE, EchoService

ROUTER = spiffe_id("ragloom-router")


@pytest.fixture
def ca(tmp_path):
    return LocalCA(tmp_path / "pki")


@pytest.fixture
async def secure_echo(ca):
    server_id = ca.issue("indexer", spiffe_id("ragloom-indexer"))
    settings = ServiceSettings(port=0, grace_s=1, tls_cert=str(server_id.cert), tls_key=str(server_id.key),
                               tls_ca=str(server_id.ca), allowed_callers=[ROUTER])
    service, stop = EchoService(), asyncio.Event()
    service.warm.set()
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(service, settings, on_ready=ready.set_result, stop=stop))
    port = await asyncio.wait_for(ready, 10)
    yield f"127.0.0.1:{port}"
    stop.set()
    await asyncio.wait_for(task, 10)


async def _collect(call) -> list[bytes]:
    return [reply async for reply in call]


async def test_the_allowed_identity_gets_through(ca, secure_echo):
    async with channel(secure_echo, identity=ca.issue("router", ROUTER)) as ch:
        assert await ch.unary_unary(f"/{SERVICE}/Unary")(b"hello", timeout=5) == b"hello"
        assert await _bidi(ch, b"a", b"b") == [b"a", b"b"]
        assert await ch.stream_unary(f"/{SERVICE}/Gather")(iter([b"a", b"b"]), timeout=5) == b"ab"
        assert await _collect(ch.unary_stream(f"/{SERVICE}/Stream")(b"x", timeout=5)) == [b"first", b"never"]


async def _bidi(ch, *requests: bytes) -> list[bytes]:
    """A bidirectional call: each request written and its echo read before the next."""
    call = ch.stream_stream(f"/{SERVICE}/Bidi")(timeout=5)
    replies = []
    for request in requests:
        await call.write(request)
        replies.append(await call.read())
    await call.done_writing()
    return replies


async def _bidi_refused(ch) -> None:
    """A bidirectional call that sends nothing: a refusal arrives as its status on the first read."""
    call = ch.stream_stream(f"/{SERVICE}/Bidi")(timeout=5)
    await call.read()


async def test_another_valid_identity_is_permission_denied(ca, secure_echo):
    async with channel(secure_echo, identity=ca.issue("generator", spiffe_id("ragloom-generator"))) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/Unary")(b"hello", timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "ragloom-generator" in info.value.details()
        # every kind of method is checked: client-, server- and bidirectional streaming too (EmbedStream is one)
        for kind, call in (("unary-stream", lambda: _collect(ch.unary_stream(f"/{SERVICE}/Stream")(b"hello", timeout=5))),
                           ("stream-unary", lambda: ch.stream_unary(f"/{SERVICE}/Gather")(iter([b"a", b"b"]), timeout=5)),
                           ("stream-stream", lambda: _bidi_refused(ch))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, kind
        # health stays open to any valid certificate (probes, the launcher)
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_plaintext_and_foreign_ca_callers_are_refused(tmp_path, secure_echo):
    async with grpc.aio.insecure_channel(secure_echo) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/Unary")(b"hello", timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = LocalCA(tmp_path / "other-ca").issue("router", ROUTER)  # right name, wrong authority
    async with channel(secure_echo, identity=stranger) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/Unary")(b"hello", timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_ca_is_reused_and_certificates_carry_the_spiffe_id(tmp_path):
    from cryptography import x509

    first = LocalCA(tmp_path / "pki")
    again = LocalCA(tmp_path / "pki")
    assert first.cert_path.read_bytes() == again.cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(first.issue("router", ROUTER).cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ROUTER]
