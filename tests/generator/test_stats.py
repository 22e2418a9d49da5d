"""Per-request figures from a generation's timeline, with a hand-driven clock."""

from __future__ import annotations

import pytest

from generator.backends import Finished
from generator.stats import GenerationClock, GenerationStats


class Clock:
    def __init__(self):
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_figures_follow_from_start_first_text_and_end():
    clock = Clock()
    timer = GenerationClock(clock)
    clock.now += 0.5
    timer.saw_text()
    clock.now += 0.1
    timer.saw_text()  # only the first text counts for the time to first token
    clock.now += 0.4

    stats = timer.finish(Finished("length", prompt_tokens=300, completion_tokens=11))

    assert stats == GenerationStats(
        prompt_tokens=300,
        completion_tokens=11,
        time_to_first_token_ms=pytest.approx(500),
        inter_token_latency_ms=pytest.approx(50),  # 10 gaps over the 500 ms after the first token
        tokens_per_second=pytest.approx(11),
        total_ms=pytest.approx(1000),
    )


def test_a_reply_without_text_or_with_one_token_has_no_inter_token_latency():
    clock = Clock()
    timer = GenerationClock(clock)
    clock.now += 0.25

    stats = timer.finish(Finished("stop", prompt_tokens=5, completion_tokens=1))

    assert (stats.time_to_first_token_ms, stats.inter_token_latency_ms) == (pytest.approx(250), 0.0)
    assert stats.tokens_per_second == pytest.approx(4)
