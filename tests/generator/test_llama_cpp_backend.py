"""The llama.cpp backend with the packaged SmolLM2 model, without gRPC."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from generator.backends import ChatMessage, Delta, Finished, GenerationParams
from generator.backends.llama_cpp import LlamaCppBackend
from fabric.errors import Overloaded

pytestmark = pytest.mark.asyncio(loop_scope="module")

COUNT = [ChatMessage("user", "Count from 1 to 300, one number per line.")]
# Greedy SmolLM2 writes this story to any length (it ends the count above after ~17 tokens on some CPUs).
STORY = [ChatMessage("user", "Write a very long story about a lighthouse keeper.")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend():
    # one context on one thread: steady on a busy 2-core box
    backend = LlamaCppBackend(context_tokens=1024, threads=1, parallel=1)
    await backend.start()
    yield backend
    await backend.close()


async def generate(backend: LlamaCppBackend, params: GenerationParams) -> tuple[str, Finished]:
    items = [item async for item in backend.stream(params)]
    *deltas, finished = items
    assert all(isinstance(item, Delta) and item.text for item in deltas)
    assert isinstance(finished, Finished)
    return "".join(delta.text for delta in deltas), finished


async def test_streams_deltas_then_usage_and_respects_max_tokens(backend):
    params = GenerationParams(messages=COUNT, max_tokens=8, temperature=0.0)

    items = [item async for item in backend.stream(params)]

    assert len(items) >= 4 and all(isinstance(item, Delta) for item in items[:-1])
    assert items[-1] == Finished("length", prompt_tokens=items[-1].prompt_tokens, completion_tokens=8)
    assert items[-1].prompt_tokens > 10  # the chat template wraps the question


async def test_greedy_generation_is_repeatable_and_a_stop_sequence_holds(backend):
    params = GenerationParams(messages=COUNT, max_tokens=40, temperature=0.0)
    text, _ = await generate(backend, params)
    assert "3" in text

    stopped, finished = await generate(
        backend, GenerationParams(messages=COUNT, max_tokens=40, temperature=0.0, stop=["3"])
    )

    assert finished.finish_reason == "stop"
    assert "3" not in stopped
    assert text.startswith(stopped)


async def test_closing_the_stream_stops_the_worker(backend):
    stream = backend.stream(GenerationParams(messages=STORY, max_tokens=400, temperature=0.0))
    for _ in range(3):
        assert isinstance(await anext(stream), Delta)
    await stream.aclose()
    at_close = backend.tokens_sampled

    # The next generation gets the context only once the worker has let go of it.
    _, finished = await generate(backend, GenerationParams(messages=STORY, max_tokens=1, temperature=0.0))
    await asyncio.sleep(0.2)

    assert finished.completion_tokens == 1
    assert backend.tokens_sampled - at_close <= 3  # the token in flight, at most one more, then this one


async def test_a_busy_model_turns_away_waiters_after_queue_timeout(backend, monkeypatch):
    monkeypatch.setattr(backend.slots, "queue_timeout_s", 0.1)
    busy = backend.stream(GenerationParams(messages=STORY, max_tokens=400, temperature=0.0))
    await anext(busy)
    try:
        with pytest.raises(Overloaded):
            await anext(backend.stream(GenerationParams(messages=STORY, max_tokens=1)))
    finally:
        await busy.aclose()


async def test_a_request_that_would_miss_its_deadline_is_shed_at_once(backend):
    await generate(backend, GenerationParams(messages=STORY, max_tokens=16, temperature=0.0))  # measures service
    await asyncio.sleep(0.1)  # the worker lets go of its context
    slots = backend.slots
    assert slots.service_s is not None and slots.expected_s() == pytest.approx(slots.service_s)
    slots.check(slots.service_s * 1.5)  # one would finish in time: admitted
    busy = backend.stream(GenerationParams(messages=STORY, max_tokens=400, temperature=0.0))
    await anext(busy)
    try:
        assert slots.expected_s() == pytest.approx(2 * slots.service_s)  # behind the running one
        with pytest.raises(Overloaded) as info:
            slots.check(slots.service_s * 1.5)
        assert info.value.retry_after_s >= 0.5 and "1 running" in info.value.message
    finally:
        await busy.aclose()


async def test_two_contexts_generate_at_once():
    backend = LlamaCppBackend(context_tokens=512, threads=1, parallel=2)
    await backend.start()
    try:
        first = backend.stream(GenerationParams(messages=STORY, max_tokens=400, temperature=0.0))
        await anext(first)
        # the second context serves another request while the first still generates
        text, finished = await asyncio.wait_for(
            generate(backend, GenerationParams(messages=COUNT, max_tokens=4, temperature=0.0)), 30)
        await asyncio.sleep(0.2)  # its worker lets go of the second context
        assert finished.completion_tokens == 4 and backend.slots.running == 1
        await first.aclose()
    finally:
        await backend.close()


async def test_the_first_token_arrives_before_the_last_is_produced(backend):
    before = backend.tokens_sampled
    sampled_at_first_delta = None
    items = []
    async for item in backend.stream(GenerationParams(messages=STORY, max_tokens=24, temperature=0.0)):
        if sampled_at_first_delta is None:
            sampled_at_first_delta = backend.tokens_sampled - before
        items.append(item)

    assert items[-1].completion_tokens == 24
    assert sampled_at_first_delta <= 3


async def test_cancelling_while_text_is_held_back_stops_at_the_next_token(backend):
    greedy = GenerationParams(messages=STORY, max_tokens=30, temperature=0.0)
    text, _ = await generate(backend, greedy)
    # A stop sequence the reply keeps matching: llama.cpp holds all its text back and yields nothing.
    held = GenerationParams(messages=STORY, max_tokens=400, temperature=0.0, stop=[text + "\x00never"])
    stream = backend.stream(held)
    waiting = asyncio.create_task(anext(stream))
    start = backend.tokens_sampled
    while backend.tokens_sampled - start < 5:
        await asyncio.sleep(0.01)
    assert not waiting.done()

    waiting.cancel()  # what a cancelled gRPC call does to the handler
    with pytest.raises(asyncio.CancelledError):
        await waiting
    at_cancel = backend.tokens_sampled
    _, finished = await generate(backend, GenerationParams(messages=STORY, max_tokens=1, temperature=0.0))

    assert finished.completion_tokens == 1
    assert backend.tokens_sampled - at_cancel <= 3  # the token in flight, the forced end, then this one
