"""The OpenAI-compatible backend against a real local streaming HTTP server, directly and through gRPC."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from google.rpc import error_details_pb2

from generator.backends import ChatMessage, Delta, Finished, GenerationParams
from generator.backends.openai import OpenAIBackend, OpenAIOptions
from generator.server import Settings
from fabric.errors import FailedPrecondition, InvalidArgument, Overloaded, Unavailable
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc

from .support import FakeOpenAI, Reply, chunk, running_generator, status_details, usage

PARAMS = GenerationParams(messages=[ChatMessage("user", "Say hi.")], max_tokens=16)


@pytest.fixture
async def fake():
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def backend(fake):
    backend = OpenAIBackend(fake.base_url, "tiny-model", api_key="secret", request_timeout_s=5.0)
    await backend.start()
    yield backend
    await backend.close()


async def test_text_streams_as_the_upstream_produces_it(fake, backend):
    words = ["Hello", ",", " world", "!"]
    fake.reply = Reply(events=[*map(chunk, words), chunk(finish_reason="stop"), usage(12, 4)], delay_s=0.1)
    params = GenerationParams(
        messages=[ChatMessage("system", "Be brief."), ChatMessage("user", "Say hi.")],
        max_tokens=8,
        temperature=0.5,
        top_p=0.9,
        stop=["\n\n"],
        seed=42,
    )

    items, sent_at_first_delta = [], None
    async for item in backend.stream(params):
        if sent_at_first_delta is None:
            sent_at_first_delta = fake.sent
        items.append(item)

    assert sent_at_first_delta < len(fake.reply.events)  # the first token arrived before the last was produced
    assert items == [*map(Delta, words), Finished("stop", prompt_tokens=12, completion_tokens=4)]
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer secret"
    assert request.body == {
        "model": "tiny-model",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
        "max_tokens": 8,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 42,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_length_finish_and_missing_usage(fake, backend):
    fake.reply = Reply(events=[chunk("a"), chunk("b"), chunk(finish_reason="length")])

    items = [item async for item in backend.stream(PARAMS)]

    assert items[-1] == Finished("length", prompt_tokens=0, completion_tokens=2)


async def test_a_stream_cut_short_is_unavailable(fake, backend):
    fake.reply = Reply(events=[chunk("a")])  # [DONE] without a finish_reason

    with pytest.raises(Unavailable, match="before the reply finished"):
        [item async for item in backend.stream(PARAMS)]


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (429, {"error": {"message": "rate limited"}}, Overloaded),
        (503, {"error": {"message": "loading model"}}, Unavailable),
        (500, {}, Unavailable),
        (408, {"error": {"message": "request timeout"}}, Unavailable),
        (400, {"error": {"message": "context length exceeded"}}, InvalidArgument),
        (413, {"error": {"message": "payload too large"}}, InvalidArgument),
        (422, {"detail": "messages must not be empty"}, InvalidArgument),
        (401, {"error": {"message": "bad key"}}, FailedPrecondition),
        (404, {"error": {"message": "no such model"}}, FailedPrecondition),
    ],
)
async def test_http_errors_map_to_domain_errors(fake, backend, status, error, expected):
    fake.reply = Reply(status=status, error=error, headers={"Retry-After": "3"})

    with pytest.raises(expected) as caught:
        [item async for item in backend.stream(PARAMS)]

    assert f"HTTP {status}" in caught.value.message
    if message := (error.get("error") or {}).get("message") or error.get("detail"):
        assert message in caught.value.message
    if expected is Overloaded:
        assert caught.value.retry_after_s == 3.0
    if expected is InvalidArgument:
        assert caught.value.field == "messages"


async def test_unreachable_upstream_is_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", request_timeout_s=2.0)
    await backend.start()
    try:
        with pytest.raises(Unavailable, match="unreachable"):
            [item async for item in backend.stream(PARAMS)]
    finally:
        await backend.close()


async def test_closing_the_stream_closes_the_upstream_connection(fake, backend):
    fake.reply = Reply(events=[chunk(f"t{i} ") for i in range(100)], delay_s=0.05)

    stream = backend.stream(PARAMS)
    assert await anext(stream) == Delta("t0 ")
    await stream.aclose()

    await asyncio.wait_for(fake.hung_up.wait(), timeout=2)
    assert fake.sent < 10


# Through the gRPC server: upstream failures keep their meaning, a cancelled call hangs up upstream.


@pytest.fixture
async def stub(fake):
    settings = Settings(
        port=0, grace_s=0.5, backend="openai", openai=OpenAIOptions(base_url=fake.base_url, request_timeout_s=5.0)
    )
    async with running_generator(settings) as (target, _), grpc.aio.insecure_channel(target) as channel:
        yield generator_pb2_grpc.GeneratorServiceStub(channel)


def request() -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(messages=[generator_pb2.Message(role="user", content="Say hi.")], max_tokens=8)


async def test_grpc_streams_text_then_finish_and_usage(fake, stub):
    words = ["Hi", " there", ",", " friend"]
    fake.reply = Reply(events=[*map(chunk, words), chunk(finish_reason="stop"), usage(9, 4)], delay_s=0.05)

    replies, sent_at_first_reply = [], None
    async for reply in stub.Generate(request(), timeout=10):
        sent_at_first_reply = fake.sent if sent_at_first_reply is None else sent_at_first_reply
        replies.append(reply)

    assert sent_at_first_reply < len(words)  # the first token reached the caller before the last was produced
    assert [r.text for r in replies[:-1]] == words
    assert all(r.finish_reason == generator_pb2.FINISH_REASON_UNSPECIFIED for r in replies[:-1])
    last = replies[-1]
    assert last.finish_reason == generator_pb2.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (9, 4)
    # the first token is timed when it arrived, not at the end: at least three 50 ms gaps come after it
    # (a lower bound whatever the machine's speed)
    assert 0 < last.usage.time_to_first_token_ms <= last.usage.total_ms - 3 * 50
    assert last.usage.inter_token_latency_ms >= 50  # an event every 50 ms (the last ones carry no token)
    assert last.usage.tokens_per_second == pytest.approx(4 / (last.usage.total_ms / 1000))
    info = await stub.Info(generator_pb2.InfoRequest(), timeout=5)
    assert (info.backend, info.context_tokens) == ("openai", 2048)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (503, grpc.StatusCode.UNAVAILABLE),
        (400, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_grpc_reports_upstream_errors_by_meaning(fake, stub, status, code):
    fake.reply = Reply(status=status, error={"error": {"message": "upstream says no"}}, headers={"Retry-After": "2"})

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [reply async for reply in stub.Generate(request(), timeout=10)]

    assert caught.value.code() == code
    assert "upstream says no" in caught.value.details()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        [retry] = status_details(caught.value, error_details_pb2.RetryInfo)
        assert retry.retry_delay.seconds == 2


async def test_grpc_cancel_hangs_up_upstream(fake, stub):
    fake.reply = Reply(events=[chunk(f"t{i} ") for i in range(100)], delay_s=0.05)

    call = stub.Generate(request(), timeout=10)
    assert (await call.read()).text == "t0 "
    started = time.monotonic()
    call.cancel()

    await asyncio.wait_for(fake.hung_up.wait(), timeout=2)
    assert time.monotonic() - started < 1
    assert fake.sent < 20


async def test_score_is_unimplemented_for_a_server_that_gives_no_prompt_probabilities(stub):
    # The router reads UNIMPLEMENTED as "keep the reranker's order", not as a failure.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(generator_pb2.ScoreRequest(contexts=["a passage"], continuation="why?"), timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "openai" in caught.value.details()
