"""Per-request figures of one generation: what the last GenerateResponse's Usage reports, ready for metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from generator.backends.base import Finished


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    #: Request accepted → first text handed to the caller.
    time_to_first_token_ms: float
    #: Mean gap between completion tokens after the first (the decode pace); 0 with fewer than 2 tokens.
    inter_token_latency_ms: float
    #: Completion tokens over the whole request, prompt processing included.
    tokens_per_second: float
    #: Request accepted → generation finished.
    total_ms: float


class GenerationClock:
    """Times one generation as its items pass by: started on creation, then `saw_text` per Delta, `finish` once."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._started = now()
        self._first_text: float | None = None

    def saw_text(self) -> None:
        if self._first_text is None:
            self._first_text = self._now()

    def finish(self, finished: Finished) -> GenerationStats:
        ended = self._now()
        first = ended if self._first_text is None else self._first_text
        total_s = ended - self._started
        tokens = finished.completion_tokens
        return GenerationStats(
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=tokens,
            time_to_first_token_ms=(first - self._started) * 1000,
            inter_token_latency_ms=(ended - first) * 1000 / (tokens - 1) if tokens > 1 else 0.0,
            tokens_per_second=tokens / total_s if total_s > 0 else 0.0,
            total_ms=total_s * 1000,
        )
