"""The batcher over a stand-in model whose vectors name the text they came from, and over the real fp32 model."""

import asyncio
import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from embedder.batcher import Batcher
from embedder.model import Tokenized
from embedder.planning import RunLimits, plan_runs
from fabric.errors import InvalidArgument, Overloaded


class FakeModel:
    """Text "t<k> w w ..." → one token per word, ids [k, 0, 0, ...]; its vector is (k, tokens, 0, 0)."""

    def __init__(self, max_rows=4, max_tokens=64):
        self.spec = SimpleNamespace(dimension=4, max_tokens=512)
        self.limits = RunLimits(max_rows=max_rows, max_tokens=max_tokens, run_cost_tokens=8)
        self.gate = threading.Event()
        self.gate.set()
        self.runs: list[list[int]] = []  # the first id of every row of every run
        self.fail_next = False

    def tokenize(self, texts, reject_overlong=False):
        rows = [np.array([int(t.split()[0][1:])] + [0] * (len(t.split()) - 1), dtype=np.int64) for t in texts]
        if reject_overlong and any(len(r) > self.spec.max_tokens for r in rows):
            raise InvalidArgument("texts[0]", "too long")
        return Tokenized(rows, [False] * len(rows))

    def plan(self, lengths):
        return plan_runs(lengths, self.limits)

    def run(self, rows):
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("model broke")
        self.runs.append([int(r[0]) for r in rows])
        return np.array([[r[0], len(r), 0, 0] for r in rows], dtype=np.float32)


def _text(k: int, words: int) -> str:
    return f"t{k} " + "w " * words


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
async def fake(request):
    model = FakeModel()
    batcher = Batcher(model, workers=request.param, max_wait_s=0.002, max_queued_tokens=10_000)
    batcher.start()
    yield model, batcher
    model.gate.set()
    await batcher.close()


async def test_concurrent_callers_each_get_their_own_vectors_in_order(fake):
    model, batcher = fake
    model.limits = RunLimits(max_rows=16, max_tokens=512, run_cost_tokens=8)
    rng = random.Random(7)
    calls = [[(k * 10 + j, rng.randint(1, 40)) for j in range(rng.randint(1, 9))] for k in range(40)]
    model.gate.clear()  # hold the worker so calls pile up and must share runs
    tasks = [asyncio.ensure_future(batcher.embed([_text(k, w) for k, w in call])) for call in calls]
    await asyncio.sleep(0.05)
    model.gate.set()
    results = await asyncio.gather(*tasks)
    for call, result in zip(calls, results):
        expected = [[k, w + 1, 0, 0] for k, w in call]
        np.testing.assert_array_equal(result.vectors, expected)
        assert result.token_counts == [w + 1 for _, w in call]
    assert batcher.stats.texts == sum(map(len, calls))
    assert max(len({k // 10 for k in run}) for run in model.runs) > 1, "no run mixed the texts of several calls"
    assert max(map(len, model.runs)) <= model.limits.max_rows
    assert batcher.queued_tokens == 0


async def test_a_call_larger_than_one_run_is_split_and_reassembled(fake):
    model, batcher = fake
    call = [(k, 30 if k % 3 else 2) for k in range(23)]
    result = await batcher.embed([_text(k, w) for k, w in call])
    np.testing.assert_array_equal(result.vectors[:, 0], [k for k, _ in call])
    assert len(model.runs) >= 23 // model.limits.max_rows


async def test_overload_is_refused_with_a_retry_hint_and_nothing_is_lost():
    model = FakeModel()
    batcher = Batcher(model, max_wait_s=0, max_queued_tokens=50)
    batcher.start()
    try:
        model.gate.clear()
        first = asyncio.ensure_future(batcher.embed([_text(1, 30)]))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await batcher.embed([_text(2, 30)])
        assert refused.value.retry_after_s > 0
        model.gate.set()
        assert (await first).vectors[0, 0] == 1
        assert (await batcher.embed([_text(3, 30)])).vectors[0, 0] == 3
    finally:
        model.gate.set()
        await batcher.close()


async def test_a_caller_that_gives_up_frees_its_place():
    model = FakeModel()
    batcher = Batcher(model, workers=1, max_wait_s=0, max_queued_tokens=1000)
    batcher.start()
    try:
        model.gate.clear()
        running = asyncio.ensure_future(batcher.embed([_text(1, 5)]))
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(batcher.embed([_text(2, 5)] * 3))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert batcher.queued_tokens == 6
        model.gate.set()
        await running
        assert batcher.queued_tokens == 0
        assert batcher.stats.texts == 1, "the abandoned texts were still embedded"
    finally:
        model.gate.set()
        await batcher.close()


async def test_a_failed_run_fails_its_callers_and_the_batcher_carries_on(fake):
    model, batcher = fake
    model.fail_next = True
    with pytest.raises(RuntimeError, match="model broke"):
        await batcher.embed([_text(1, 3)])
    assert (await batcher.embed([_text(2, 3)])).vectors[0, 0] == 2
    assert batcher.queued_tokens == 0


async def test_a_lone_caller_is_not_held_for_the_batch_wait():
    model = FakeModel()
    batcher = Batcher(model, max_wait_s=0.5, max_queued_tokens=1000)
    batcher.start()
    try:
        loop = asyncio.get_running_loop()
        for k in range(3):
            started = loop.time()
            await batcher.embed([_text(k, 3)])
            await asyncio.sleep(0.01)
            assert loop.time() - started < 0.25
    finally:
        await batcher.close()


async def test_real_model_batched_under_concurrency_matches_one_at_a_time(fp32_model):
    batcher = Batcher(fp32_model, workers=2, max_wait_s=0.002)
    batcher.start()
    try:
        rng = random.Random(3)
        words = "the queen bee lays eggs while light keepers trim wicks and yeast raises dough slowly".split()
        texts = [" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(48)]
        alone = np.stack([fp32_model.embed([t]).vectors[0] for t in texts])
        calls = [texts[i : i + n] for i, n in zip(range(0, 48, 3), [1, 2, 3] * 16)]
        results = await asyncio.gather(*(batcher.embed(c) for c in calls))
        for call, result in zip(calls, results):
            rows = [texts.index(t) for t in call]
            np.testing.assert_allclose(result.vectors, alone[rows], atol=1e-5)
        assert batcher.stats.runs < len(calls)
    finally:
        await batcher.close()
