"""The generator over gRPC with the llama.cpp backend: request validation, streaming, cancellation, Info."""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generator.backends.llama_cpp import LlamaCppOptions
from generator.server import Settings
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc

from .support import running_generator, status_details

pytestmark = pytest.mark.asyncio(loop_scope="module")

Message = generator_pb2.Message


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    settings = Settings(port=0, grace_s=0.5, context_tokens=1024, llama_cpp=LlamaCppOptions(threads=1))
    async with running_generator(settings) as (target, service), grpc.aio.insecure_channel(target) as channel:
        yield channel, service


@pytest.fixture
def channel(server):
    return server[0]


@pytest.fixture
def stub(channel):
    return generator_pb2_grpc.GeneratorServiceStub(channel)


def user(text: str = "Name a colour.") -> list[Message]:
    return [Message(role="user", content=text)]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (generator_pb2.GenerateRequest(), "messages"),
        (generator_pb2.GenerateRequest(messages=[Message(role="user", content="  \n")]), "messages"),
        (generator_pb2.GenerateRequest(messages=[Message(role="robot", content="hi")]), "messages[0].role"),
        (generator_pb2.GenerateRequest(messages=user(), max_tokens=0), "max_tokens"),
        (generator_pb2.GenerateRequest(messages=user(), max_tokens=-5), "max_tokens"),
        (generator_pb2.GenerateRequest(messages=user(), temperature=-0.1), "temperature"),
        (generator_pb2.GenerateRequest(messages=user(), top_p=0.0), "top_p"),
        (generator_pb2.GenerateRequest(messages=user(), top_p=1.5), "top_p"),
        (generator_pb2.GenerateRequest(messages=user(), stop=["ok", ""]), "stop[1]"),
    ],
)
async def test_bad_requests_are_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [reply async for reply in stub.Generate(request_, timeout=10)]

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
    [bad_request] = status_details(caught.value, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == [field]


async def test_generates_after_bad_requests_and_stays_serving(channel, stub):
    request = generator_pb2.GenerateRequest(messages=user(), max_tokens=6, temperature=0.0, top_p=1.0, seed=7)

    replies = [reply async for reply in stub.Generate(request, timeout=30)]

    *pieces, last = replies
    assert len(pieces) >= 2 and all(p.text and not p.HasField("usage") for p in pieces)
    assert (last.text, last.finish_reason) == ("", generator_pb2.FINISH_REASON_LENGTH)
    usage = last.usage
    assert usage.completion_tokens == 6 and usage.prompt_tokens > 0
    assert 0 < usage.time_to_first_token_ms <= usage.total_ms
    assert 0 < usage.inter_token_latency_ms < usage.total_ms
    assert usage.tokens_per_second == pytest.approx(6 / (usage.total_ms / 1000))
    health = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="ragloom.generator.v1.GeneratorService"), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_info_describes_backend_and_model(stub):
    info = await stub.Info(generator_pb2.InfoRequest(), timeout=5)

    assert (info.backend, info.model, info.context_tokens) == ("llama_cpp", "SmolLM2-135M-Instruct.Q4_1.gguf", 1024)


async def test_a_call_past_its_deadline_stops_the_generation(server, stub):
    backend = server[1].backend
    long_reply = generator_pb2.GenerateRequest(
        messages=user(LONG), max_tokens=400, temperature=0.0
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [reply async for reply in stub.Generate(long_reply, timeout=0.5)]
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    at_deadline = backend.tokens_sampled

    # Served only once the cancelled generation has let go of the model.
    short = generator_pb2.GenerateRequest(messages=user(), max_tokens=1)
    replies = [reply async for reply in stub.Generate(short, timeout=30)]

    assert replies[-1].usage.completion_tokens == 1
    assert backend.tokens_sampled - at_deadline <= 3


# Greedy SmolLM2 writes this story to any length; it ends "count from 1 to 300" after ~17 tokens on some CPUs.
LONG = "Write a very long story about a lighthouse keeper."


def count(max_tokens: int) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(
        messages=user(LONG), max_tokens=max_tokens, temperature=0.0
    )


async def test_the_first_reply_arrives_before_the_last_token_is_produced(server, stub):
    backend = server[1].backend
    before = backend.tokens_sampled
    sampled_at_first_reply = None

    replies = []
    async for reply in stub.Generate(count(32), timeout=30):
        if sampled_at_first_reply is None:
            sampled_at_first_reply = backend.tokens_sampled - before
        replies.append(reply)

    assert replies[-1].usage.completion_tokens == 32
    assert sampled_at_first_reply <= 3


async def test_a_cancelled_call_stops_the_generation(server, stub):
    backend = server[1].backend

    call = stub.Generate(count(400), timeout=30)
    async for _ in call:
        break  # the reply is under way
    assert call.cancel()
    at_cancel = backend.tokens_sampled

    # Served only once the cancelled generation has let go of the model.
    replies = [reply async for reply in stub.Generate(count(1), timeout=30)]

    assert replies[-1].usage.completion_tokens == 1
    assert backend.tokens_sampled - at_cancel <= 3


PASSAGES = ["For more distant patches she performs the waggle dance, a run straight ahead while waggling.",
            "The cells hold developing brood and stores of pollen and honey.",
            "Wasps build nests of chewed wood pulp."]
QUESTION = "How do honeybees tell each other where the flowers are?"


def reading(passage: str) -> str:
    return f"Passage: honeybee: {passage}\nPlease write a question based on this passage.\nQuestion: "


async def test_score_reads_the_question_as_likeliest_after_the_passage_it_is_about(stub):
    reply = await stub.Score(generator_pb2.ScoreRequest(contexts=[reading(p) for p in PASSAGES], continuation=QUESTION),
                             timeout=30)

    waggle, cells, wasps = reply.mean_logprob
    assert waggle > cells and waggle > wasps and all(lp < 0 for lp in reply.mean_logprob)
    assert reply.continuation_tokens >= 8 and reply.tokens > 3 * reply.continuation_tokens
    # Each context is scored on its own: alone, the same figure as among the others.
    alone = await stub.Score(generator_pb2.ScoreRequest(contexts=[reading(PASSAGES[1])], continuation=QUESTION),
                             timeout=30)
    assert alone.mean_logprob[0] == pytest.approx(cells, abs=0.05)


async def test_more_contexts_than_one_batch_holds_are_scored_alike_in_order(stub):
    contexts = [f"Passage: item {i}.\nQuestion: " for i in range(18)]  # 16 sequences fit one decode
    reply = await stub.Score(generator_pb2.ScoreRequest(contexts=contexts, continuation="What is item 3?"), timeout=60)

    assert len(reply.mean_logprob) == 18
    alone = await stub.Score(generator_pb2.ScoreRequest(contexts=contexts[17:], continuation="What is item 3?"),
                             timeout=30)
    assert reply.mean_logprob[17] == pytest.approx(alone.mean_logprob[0], abs=0.05)
    assert reply.mean_logprob[3] == max(reply.mean_logprob)  # the question names item 3


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (generator_pb2.ScoreRequest(continuation="why?"), "contexts"),
        (generator_pb2.ScoreRequest(contexts=["a"] * 65, continuation="why?"), "contexts"),
        (generator_pb2.ScoreRequest(contexts=["a passage"], continuation=" "), "continuation"),
        (generator_pb2.ScoreRequest(contexts=["word " * 3000], continuation="why?"), "contexts[0]"),
    ],
)
async def test_bad_score_requests_are_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(request_, timeout=30)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
