"""Dynamic batching: texts of concurrent calls share model runs.

Each call's texts are tokenised, admitted against a bound on queued tokens (else
`Overloaded`), and queued one row per text. One scheduler task takes the oldest rows
(worth one token budget), has the model's planner group them by length into runs,
and hands each run to the next free worker thread (ONNX Runtime releases the GIL, so
the event loop keeps serving; several workers run several runs at once). Results go
back after each run, row by row, so a call larger than one run is split over several
and reassembled in order. Texts arriving meanwhile gather for the next plan, made
when a worker is free and the current plan is used up.

When no run is in flight and more than one call is waiting (a burst is arriving), the
next plan waits up to `max_wait_s` after the oldest call's arrival for the burst to
fill its token budget; a lone caller is never delayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge, Histogram

from embedder.model import Embedded, OnnxEmbedder, Tokenized
from fabric.errors import Overloaded, Unavailable

log = logging.getLogger(__name__)

# Calls with more characters than this are tokenised in a thread instead of on the event loop.
_INLINE_TOKENIZE_CHARS = 4096
# Rows planned together, in model runs' worth of rows: planning costs rows × max_rows steps on the loop.
_PLAN_ROWS = 4


@dataclass
class BatchStats:
    """Counters since start."""

    runs: int = 0
    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0


class _Call:
    """One caller's texts on their way through the queue."""

    __slots__ = ("future", "vectors", "waiting", "queued_tokens", "admitted_at", "started_at", "inference_s")

    def __init__(self, future: asyncio.Future, rows: int, dimension: int, tokens: int):
        self.future = future
        self.vectors = np.empty((rows, dimension), dtype=np.float32)
        self.waiting = rows
        self.queued_tokens = tokens
        self.admitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.inference_s = 0.0


class _Row:
    __slots__ = ("call", "index", "ids")

    def __init__(self, call: _Call, index: int, ids: np.ndarray):
        self.call = call
        self.index = index
        self.ids = ids


BATCH_SIZE = Histogram(
    "ragloom_embedder_batch_size", "Texts per model run (concurrent calls share runs)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_DEPTH = Gauge("ragloom_embedder_queue_depth", "Tokens admitted and waiting for or in a model run")
QUEUE_CAPACITY = Gauge("ragloom_embedder_queue_capacity", "Tokens the queue holds before RESOURCE_EXHAUSTED")


class Batcher:
    """Embeds texts for many concurrent callers in shared model runs."""

    def __init__(
        self, model: OnnxEmbedder, *, workers: int = 1, max_wait_s: float = 0.002, max_queued_tokens: int = 131072
    ):
        if workers < 1 or max_wait_s < 0 or max_queued_tokens < 1:
            raise ValueError("workers and max_queued_tokens must be positive, max_wait_s not negative")
        self.model = model
        self.workers = workers
        self.max_wait_s = max_wait_s
        self.max_queued_tokens = max_queued_tokens
        self.stats = BatchStats()
        self._pending: deque[_Row] = deque()
        self._queued_tokens = 0  # admitted and not yet delivered, cancelled or failed
        self._arrived = asyncio.Event()
        self._calls = 0  # admitted and not finished
        self._tokens_per_s = 5000.0  # refined by every run; only used for the retry hint
        self._worker = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed")
        self._free_workers = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task] = set()
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        QUEUE_DEPTH.set_function(lambda: self._queued_tokens)
        QUEUE_CAPACITY.set(self.max_queued_tokens)
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="embedder-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        while self._pending:
            self._fail(self._pending.popleft().call, Unavailable("embedder is shutting down"))
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._tokenizer.shutdown(wait=True, cancel_futures=True)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    async def embed(self, texts: Sequence[str], reject_overlong: bool = False) -> Embedded:
        """Vectors for `texts` in order; raises `Overloaded` when too much work is queued."""
        self._refuse_if_full(0)
        tokenized = await self._tokenize(texts, reject_overlong)
        lengths = tokenized.lengths
        tokens = sum(lengths)
        self._refuse_if_full(tokens)
        loop = asyncio.get_running_loop()
        call = _Call(loop.create_future(), len(lengths), self.model.spec.dimension, tokens)
        self._pending.extend(_Row(call, i, ids) for i, ids in enumerate(tokenized.ids))
        self._queued_tokens += tokens
        self._calls += 1
        self._arrived.set()
        try:
            await call.future
        finally:
            self._calls -= 1
            self._release(call, call.queued_tokens)  # what is left when the caller gave up or the run failed
        return Embedded(
            vectors=call.vectors,
            token_counts=lengths,
            truncated=tokenized.truncated,
            inference_ms=call.inference_s * 1000,
            queue_ms=((call.started_at or call.admitted_at) - call.admitted_at) * 1000,
        )

    def _refuse_if_full(self, tokens: int) -> None:
        # An empty queue takes any one call, so a call bigger than the bound still gets through alone.
        if self._queued_tokens and self._queued_tokens + tokens > self.max_queued_tokens:
            retry_after = min(5.0, max(0.05, self._queued_tokens / self._tokens_per_s))
            raise Overloaded(
                f"embedder has {self._queued_tokens} tokens queued (limit {self.max_queued_tokens}); "
                f"retry in {retry_after:.2f}s",
                retry_after_s=retry_after,
            )

    async def _tokenize(self, texts: Sequence[str], reject_overlong: bool) -> Tokenized:
        if sum(len(t) for t in texts) <= _INLINE_TOKENIZE_CHARS:
            return self.model.tokenize(texts, reject_overlong)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer, self.model.tokenize, texts, reject_overlong)

    def _release(self, call: _Call, tokens: int) -> None:
        call.queued_tokens -= tokens
        self._queued_tokens -= tokens

    def _fail(self, call: _Call, exc: BaseException) -> None:
        if not call.future.done():
            call.future.set_exception(exc)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        planned: deque[list[_Row]] = deque()
        while True:
            await self._free_workers.acquire()
            if not planned:
                planned.extend(await self._next_step())
            task = loop.create_task(self._run(planned.popleft()))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, rows: list[_Row]) -> None:
        BATCH_SIZE.observe(len(rows))
        try:
            await self._execute(rows)
        except asyncio.CancelledError:
            for call in _calls(rows):
                self._fail(call, Unavailable("embedder is shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - the callers get the error; the batcher keeps going
            log.exception("model run over %d texts failed", len(rows))
            for call in _calls(rows):
                self._fail(call, exc)
        finally:
            self._free_workers.release()

    async def _next_step(self) -> list[list[_Row]]:
        """The next runs: the oldest live rows, grouped by the model's planner."""
        while True:
            while self._pending and self._pending[0].call.future.done():
                self._pending.popleft()  # its caller gave up; its tokens were released then
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._gather()
            candidates = self._take_candidates()
            if candidates:
                plan = self.model.plan([len(row.ids) for row in candidates])
                return [[candidates[i] for i in run] for run in plan]

    async def _gather(self) -> None:
        if self._running or self._calls < 2:
            return
        deadline = self._pending[0].call.admitted_at + self.max_wait_s
        while self._queued_tokens < self.model.limits.max_tokens:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_candidates(self) -> list[_Row]:
        """The oldest live rows worth at most one token budget (at least one row), few enough to plan quickly."""
        candidates: list[_Row] = []
        tokens = 0
        limits = self.model.limits
        while self._pending:
            row = self._pending[0]
            if row.call.future.done():
                self._pending.popleft()
                continue
            full = tokens + len(row.ids) > limits.max_tokens or len(candidates) >= _PLAN_ROWS * limits.max_rows
            if candidates and full:
                break
            candidates.append(self._pending.popleft())
            tokens += len(row.ids)
        return candidates

    async def _execute(self, rows: list[_Row]) -> None:
        rows = [r for r in rows if not r.call.future.done()]
        if not rows:
            return
        started = time.perf_counter()
        calls = _calls(rows)
        for call in calls:
            if call.started_at is None:
                call.started_at = started
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._worker, self.model.run, [r.ids for r in rows])
        seconds = time.perf_counter() - started
        tokens = sum(len(r.ids) for r in rows)
        self.stats.runs += 1
        self.stats.texts += len(rows)
        self.stats.tokens += tokens
        self.stats.padded_tokens += len(rows) * max(len(r.ids) for r in rows)
        self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * tokens / max(seconds, 1e-6)
        for call in calls:
            call.inference_s += seconds
        for row, vector in zip(rows, vectors):
            call = row.call
            if call.future.done():
                continue
            call.vectors[row.index] = vector
            call.waiting -= 1
            self._release(call, len(row.ids))
            if call.waiting == 0:
                call.future.set_result(None)


def _calls(rows: list[_Row]) -> list[_Call]:
    return list({id(r.call): r.call for r in rows}.values())
