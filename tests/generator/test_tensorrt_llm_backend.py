"""The tensorrt_llm backend's own logic against a test double of TensorRT-LLM's LLM API, directly and through gRPC.

The real package needs a CUDA GPU and cannot run here; the one test that uses it is marked `gpu`.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from generator.backends import ChatMessage, Delta, Finished, GenerationParams, create_backend
from generator.backends.tensorrt_llm import StopScanner, TensorRTLLMBackend, TensorRTLLMOptions
from generator.server import Settings
from fabric.errors import InvalidArgument, Overloaded, Unavailable
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc

from . import fake_tensorrt_llm
from .support import running_generator

ASK = [ChatMessage("system", "Answer from the sources."), ChatMessage("user", "What is the answer?")]


@pytest.fixture
def fake(monkeypatch):
    return fake_tensorrt_llm.install(monkeypatch)


@pytest.fixture
async def backend(fake, tmp_path):
    backend = TensorRTLLMBackend(tmp_path, context_tokens=512)
    await backend.start()
    yield backend
    await backend.close()


def engine(fake) -> fake_tensorrt_llm.FakeLLM:
    [llm] = fake.instances
    return llm


async def collect(backend, params: GenerationParams) -> tuple[list[Delta], Finished]:
    *deltas, finished = [item async for item in backend.stream(params)]
    assert all(isinstance(d, Delta) and d.text for d in deltas) and isinstance(finished, Finished)
    return deltas, finished


async def test_settings_reach_the_llm_constructor_and_close_shuts_it_down(fake, tmp_path):
    settings = Settings(
        backend="tensorrt_llm",
        model_path=str(tmp_path),
        context_tokens=4096,
        tensorrt_llm=TensorRTLLMOptions(
            tokenizer="/models/tok",
            tensor_parallel_size=2,
            max_batch_size=64,
            max_num_tokens=8192,
            kv_cache_fraction=0.8,
        ),
    )
    backend = create_backend(settings.backend, settings.common, settings.backend_options())

    await backend.start()
    llm = engine(fake)
    assert type(llm) is fake  # a checkpoint folder: the default (PyTorch flow) LLM
    assert llm.model == str(tmp_path)
    assert llm.kwargs == {
        "tensor_parallel_size": 2,
        "max_seq_len": 4096,
        "tokenizer": "/models/tok",
        "max_batch_size": 64,
        "max_num_tokens": 8192,
        "kv_cache_config": fake_tensorrt_llm.KvCacheConfig(free_gpu_memory_fraction=0.8),
    }
    assert backend.info() == (tmp_path.name, 4096)
    await backend.close()
    assert llm.shut_down


async def test_unset_limits_are_left_to_tensorrt_llm_and_an_engine_folder_gets_the_tensorrt_flow(fake, tmp_path):
    (tmp_path / "rank0.engine").write_bytes(b"")
    backend = TensorRTLLMBackend(tmp_path)

    await backend.start()

    llm = engine(fake)
    assert isinstance(llm, fake_tensorrt_llm.FakeEngineLLM)
    assert llm.kwargs == {"tensor_parallel_size": 1, "max_seq_len": 2048}
    await backend.close()


async def test_a_missing_model_folder_or_tokenizer_fails_start(fake, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        await TensorRTLLMBackend(tmp_path / "nope").start()
    monkeypatch.setattr(fake_tensorrt_llm, "FakeTokenizer", lambda: None)  # a folder without a tokenizer
    with pytest.raises(FileNotFoundError, match="set --trtllm-tokenizer"):
        await TensorRTLLMBackend(tmp_path).start()
    assert engine(fake).shut_down
    with pytest.raises(ValueError, match="needs model_path"):
        Settings(backend="tensorrt_llm").validate()
    with pytest.raises(ValueError, match="needs model_path"):
        create_backend("tensorrt_llm")


async def test_text_streams_as_the_engine_produces_it(fake, backend):
    fake.script = ["Forty", "-", "two", ",", " says", " [1]", "."]
    fake.step_s = 0.03
    params = GenerationParams(messages=ASK, max_tokens=32, temperature=0.5, top_p=0.9, stop=["\n\n"], seed=-1)

    produced_at_first_delta = None
    items = []
    async for item in backend.stream(params):
        if produced_at_first_delta is None:
            produced_at_first_delta = engine(fake).tokens_generated
        items.append(item)

    assert produced_at_first_delta < len(fake.script)  # the first token arrived before the last was produced
    assert "".join(i.text for i in items[:-1]) == "Forty-two, says [1]."
    llm = engine(fake)
    # The model's chat template, tokenized without extra special tokens: the template has them.
    assert llm.tokenizer.encoded == [
        "<|system|>Answer from the sources.</s><|user|>What is the answer?</s><|assistant|>"
    ]
    [request] = llm.requests
    assert len(request.prompt_token_ids) == 7
    assert items[-1] == Finished("stop", prompt_tokens=7, completion_tokens=7)
    assert llm.sampling == [
        fake_tensorrt_llm.SamplingParams(max_tokens=32, temperature=0.5, top_p=0.9, seed=2**64 - 1, stop=["\n\n"])
    ]
    assert llm.aborted == []  # it finished by itself


async def test_temperature_zero_is_greedy_and_max_tokens_ends_with_length(fake, backend):
    fake.script = [f" {i}" for i in range(20)]

    deltas, finished = await collect(backend, GenerationParams(messages=ASK, max_tokens=5, temperature=0.0))

    assert "".join(d.text for d in deltas) == " 0 1 2 3 4"
    assert (finished.finish_reason, finished.completion_tokens) == ("length", 5)
    [sampling] = engine(fake).sampling
    assert (sampling.top_k, sampling.temperature) == (1, None)


async def test_a_stop_string_split_over_tokens_never_reaches_the_caller(fake, backend):
    fake.script = ["The", " answer", " is", " 42", ".", "\n\n", "Sources", ":", " [1]"]

    deltas, finished = await collect(backend, GenerationParams(messages=ASK, max_tokens=32, stop=["\n\nSources:"]))

    assert "".join(d.text for d in deltas) == "The answer is 42."
    assert not any("\n" in d.text for d in deltas)  # the held-back "\n\n" was never sent
    assert finished.finish_reason == "stop"


async def test_a_stop_string_the_engine_misses_is_enforced_and_the_request_aborted(fake, backend):
    fake.script = ["1", "\n", "12", "3", "\n", "14"] + ["\n"] * 50  # "3" inside the text, not a whole token
    fake.engine_stops = False

    deltas, finished = await collect(backend, GenerationParams(messages=ASK, max_tokens=64, stop=["3"]))
    produced = engine(fake).tokens_generated
    await asyncio.sleep(10 * fake.step_s)

    assert "".join(d.text for d in deltas) == "1\n12"
    assert (finished.finish_reason, finished.completion_tokens) == ("stop", 4)
    assert engine(fake).aborted == [0]
    assert engine(fake).tokens_generated - produced <= 1


async def test_closing_the_stream_aborts_the_request_and_the_engine_stops(fake, backend):
    fake.script = [f" t{i}" for i in range(500)]

    stream = backend.stream(GenerationParams(messages=ASK, max_tokens=500))
    for _ in range(3):
        assert isinstance(await anext(stream), Delta)
    await stream.aclose()
    at_close = engine(fake).tokens_generated
    await asyncio.sleep(10 * fake.step_s)

    assert engine(fake).aborted == [0]
    assert engine(fake).tokens_generated - at_close <= 1


async def test_requests_run_side_by_side_in_the_engine(fake, backend):
    fake.script = [f" t{i}" for i in range(50)]
    params = GenerationParams(messages=ASK, max_tokens=50)
    first, second = backend.stream(params), backend.stream(params)
    try:
        await anext(first)
        await asyncio.wait_for(anext(second), timeout=2)  # not queued behind the first

        assert [r.finished for r in engine(fake).requests] == [False, False]
    finally:
        await first.aclose()
        await second.aclose()
    assert sorted(engine(fake).aborted) == [0, 1]


async def test_max_in_flight_bounds_concurrent_requests(fake, tmp_path):
    fake.script = [f" t{i}" for i in range(50)]
    backend = TensorRTLLMBackend(tmp_path, max_in_flight=1, queue_timeout_s=0.1)
    await backend.start()
    params = GenerationParams(messages=ASK, max_tokens=50)
    busy = backend.stream(params)
    try:
        await anext(busy)
        with pytest.raises(Overloaded, match="busy for 0.1s"):
            await anext(backend.stream(params))
    finally:
        await busy.aclose()
    _, finished = await collect(backend, GenerationParams(messages=ASK, max_tokens=2))
    assert finished.completion_tokens == 2
    await backend.close()


async def test_a_prompt_that_fills_the_context_is_invalid_and_a_long_reply_is_cut_to_fit(fake, tmp_path):
    fake.script = [f" t{i}" for i in range(50)]
    backend = TensorRTLLMBackend(tmp_path, context_tokens=10)  # the templated ASK is 7 tokens
    await backend.start()

    _, finished = await collect(backend, GenerationParams(messages=ASK, max_tokens=16))
    assert (finished.finish_reason, finished.completion_tokens) == ("length", 3)
    assert engine(fake).sampling[0].max_tokens == 3

    long = [ChatMessage("user", "word " * 20)]
    with pytest.raises(InvalidArgument, match="the prompt is 21 tokens; the context holds 10") as caught:
        await anext(backend.stream(GenerationParams(messages=long, max_tokens=1)))
    assert caught.value.field == "messages"
    await backend.close()


async def test_a_request_the_engine_refuses_is_invalid_argument(fake, tmp_path):
    backend = TensorRTLLMBackend(tmp_path, max_num_tokens=8)
    await backend.start()

    with pytest.raises(InvalidArgument, match="max_num_tokens"):
        await anext(backend.stream(GenerationParams(messages=ASK, max_tokens=16)))
    await backend.close()


async def test_a_request_the_engine_cancels_by_itself_is_unavailable(fake, backend):
    fake.script = [f" t{i}" for i in range(50)]
    stream = backend.stream(GenerationParams(messages=ASK, max_tokens=50))
    await anext(stream)

    engine(fake).requests[0].abort()  # as the engine does when it drops a request

    with pytest.raises(Unavailable, match="cancelled"):
        async for _ in stream:
            pass


def test_stop_scanner_holds_back_only_what_a_stop_string_can_still_claim():
    scanner = StopScanner(["\n\nSources:", "END"])

    assert scanner.safe_length("The answer.\n\nSour") == len("The answer.")
    assert scanner.safe_length("The answer. EN") == len("The answer. ")
    assert scanner.safe_length("The answer. ENDS") == len("The answer. ENDS")
    assert scanner.find("a END b\n\nSources:") == 2
    assert StopScanner([]).safe_length("anything") == len("anything")


# Through the gRPC server: a cancelled call aborts the engine's request.


@pytest.fixture
async def stub(fake, tmp_path):
    settings = Settings(port=0, grace_s=0.5, backend="tensorrt_llm", model_path=str(tmp_path))
    async with running_generator(settings) as (target, _), grpc.aio.insecure_channel(target) as channel:
        yield generator_pb2_grpc.GeneratorServiceStub(channel)


def request(max_tokens: int) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(
        messages=[generator_pb2.Message(role="user", content="Say hi.")], max_tokens=max_tokens
    )


async def test_grpc_streams_then_reports_usage_and_timings(fake, stub):
    fake.script = ["Hi", " there", "!"]
    fake.step_s = 0.05

    replies = [reply async for reply in stub.Generate(request(8), timeout=10)]

    assert [r.text for r in replies[:-1]] == ["Hi", " there", "!"]
    usage = replies[-1].usage
    assert (replies[-1].finish_reason, usage.completion_tokens) == (generator_pb2.FINISH_REASON_STOP, 3)
    assert 40 < usage.time_to_first_token_ms < usage.total_ms
    assert 40 < usage.inter_token_latency_ms < 500  # a token every 50 ms, then the end of sequence
    assert usage.tokens_per_second == pytest.approx(3 / (usage.total_ms / 1000))
    info = await stub.Info(generator_pb2.InfoRequest(), timeout=5)
    assert info.backend == "tensorrt_llm"


async def test_grpc_cancel_aborts_the_engine_request(fake, stub):
    fake.script = [f" t{i}" for i in range(500)]

    call = stub.Generate(request(500), timeout=10)
    assert (await call.read()).text == " t0"
    call.cancel()
    started = time.monotonic()
    while not engine(fake).aborted and time.monotonic() - started < 2:
        await asyncio.sleep(0.01)
    at_abort = engine(fake).tokens_generated
    await asyncio.sleep(10 * fake.step_s)

    assert engine(fake).aborted == [0]
    assert engine(fake).tokens_generated - at_abort <= 1


@pytest.mark.gpu
async def test_real_tensorrt_llm_streams_and_aborts():
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (it needs a CUDA GPU)")
    model = os.environ.get("RAGLOOM_TEST_TRTLLM_MODEL")
    if not model:
        pytest.skip("set RAGLOOM_TEST_TRTLLM_MODEL to a Hugging Face checkpoint or engine folder")
    backend = TensorRTLLMBackend(model, context_tokens=1024)
    await backend.start()
    try:
        params = GenerationParams(messages=[ChatMessage("user", "Count from 1 to 50.")], max_tokens=8, temperature=0.0)
        deltas, finished = await collect(backend, params)
        assert deltas and finished.completion_tokens <= 8 and finished.prompt_tokens > 0

        stream = backend.stream(GenerationParams(messages=params.messages, max_tokens=500, temperature=0.0))
        await anext(stream)
        await stream.aclose()  # aborts the request; the next one is served normally
        _, finished = await collect(backend, params)
        assert finished.finish_reason == "length"
    finally:
        await backend.close()
