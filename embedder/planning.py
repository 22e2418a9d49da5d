"""How texts of mixed lengths are split into model runs.

Every row of a run is padded to the run's longest text, and on a CPU a run costs about
its padded token count plus a fixed overhead. Texts sorted by length are cut into
consecutive runs that minimise padded tokens + overhead × runs (dynamic programming),
within the run's row and padded-token limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RunLimits:
    """Bounds of one model run."""

    max_rows: int = 64
    #: Most padded tokens (rows × longest) in one run; a single longer text still runs alone.
    max_tokens: int = 8192
    #: A run's fixed overhead expressed in padded tokens.
    run_cost_tokens: int = 16

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_tokens < 1 or self.run_cost_tokens < 0:
            raise ValueError(f"invalid run limits {self}")


def plan_runs(lengths: Sequence[int], limits: RunLimits) -> list[list[int]]:
    """Indices into `lengths`, grouped into runs, shortest texts first.

    Costs O(len(lengths) × max_rows): callers keep the list to a few hundred texts per call
    when it is planned on an event loop.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0] + [0] * n  # best[i]: cheapest cost of the i shortest texts
    start = [0] * (n + 1)  # start[i]: where the last run of that cheapest plan begins
    for i in range(1, n + 1):
        longest = sorted_lengths[i - 1]
        best[i] = best[i - 1] + longest + limits.run_cost_tokens
        start[i] = i - 1
        for j in range(i - 2, max(-1, i - 1 - limits.max_rows), -1):
            padded = (i - j) * longest
            if padded > limits.max_tokens:
                break
            cost = best[j] + padded + limits.run_cost_tokens
            if cost < best[i]:
                best[i], start[i] = cost, j
    runs = []
    i = n
    while i > 0:
        runs.append(order[start[i] : i])
        i = start[i]
    return runs[::-1]
