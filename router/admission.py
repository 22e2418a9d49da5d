"""Admission control: work refused at the door, at once, rather than served too late.

Each kind of work has its own bounded number of places (an ask holds the generator for seconds, a
search for milliseconds, an ingest for the embedder's time): past its limit a request gets
RESOURCE_EXHAUSTED with a retry hint at once, and a flood of one kind cannot take the places of another.

Asks also pass the `AskGate`: the generator serves a few at a time, so an ask that would wait behind
the others past its caller's deadline is refused before any work is spent on it. The gate knows how
long the stage before generation takes and how long a generation holds the generator (both measured,
exponentially weighted), and how many generations run at once (the generator's Info).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from fabric.errors import Overloaded
from fabric.shedding import Ewma, expected_finish_s, refuse_if_late

ASK, SEARCH, WRITE = "ask", "search", "write"


class Admission:
    def __init__(self, limits: Mapping[str, int], retry_after_s: float = 0.5):
        if not limits or min(limits.values()) < 1:
            raise ValueError("every admission limit must be positive")
        self.limits, self.retry_after_s = dict(limits), retry_after_s
        self.inflight = {kind: 0 for kind in limits}

    @contextmanager
    def admit(self, kind: str) -> Iterator[None]:
        """Holds one of `kind`'s places for the block, or refuses with a retry hint."""
        if self.inflight[kind] >= self.limits[kind]:
            raise Overloaded(f"router has {self.inflight[kind]} {kind} requests in flight, its limit "
                             f"(--max-{kind}s); retry shortly", retry_after_s=self.retry_after_s)
        self.inflight[kind] += 1
        try:
            yield
        finally:
            self.inflight[kind] -= 1


class Passage:
    """One ask admitted by the gate; `release` (once) when it is done."""

    def __init__(self, gate: "AskGate"):
        self._gate: AskGate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.in_flight -= 1
            self._gate = None


class AskGate:
    def __init__(self, parallel: Callable[[], int] = lambda: 1, weight: float = 0.3):
        #: How many generations the generator runs at once (asked of it; 0 = it does not say).
        self.parallel = parallel
        #: Asks past the gate and not finished.
        self.in_flight = 0
        #: Mean seconds of the stage before generation (retrieval, rerank) and of one generation.
        self.before, self.generate = Ewma(weight), Ewma(weight)

    def expected_s(self) -> float | None:
        """Seconds an ask arriving now would take: retrieval, its wait for the generator, its generation."""
        return expected_finish_s(self.in_flight, self.parallel(), self.generate.value, self.before.value or 0.0)

    def check(self, remaining_s: float | None) -> None:
        """RESOURCE_EXHAUSTED now when the ask would finish after its caller's deadline."""
        refuse_if_late(self.expected_s(), remaining_s, f"router: {self.in_flight} asks ahead at the generator")

    def admit(self, remaining_s: float | None) -> "Passage":
        """`check`, and the ask counted as past the gate at once: a burst arriving together sees itself
        (counting it only once its generation starts would let the whole burst through)."""
        self.check(remaining_s)
        self.in_flight += 1
        return Passage(self)

    @contextmanager
    def passing(self) -> Iterator[None]:
        """An ask past the gate, for the block."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def record(self, total_ms: float, generate_ms: float, queue_ms: float = 0.0) -> None:
        """One finished ask that generated: its timings feed the estimate. The generation's own time leaves
        out its wait for the generator (`queue_ms`): that wait is what the queue ahead predicts, and counting
        it in the service time too would count it twice, and shed more the longer the queue got."""
        if generate_ms > 0:
            self.before.add(max(0.0, total_ms - generate_ms) / 1000)
            self.generate.add(max(0.0, generate_ms - queue_ms) / 1000)
