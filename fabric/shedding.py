"""Shedding at the door: refuse now what would finish after its caller's deadline.

Serving a request that will miss its deadline costs a whole unit of work nobody reads, and makes the
ones behind it late too; refusing it at once costs nothing and tells the caller when to come back.
The estimate is a queue's: `in_system` requests ahead (running or waiting) are served `servers` at a
time, each taking `service_s` (measured, see `Ewma`), after a fixed `before_s`.
"""

from __future__ import annotations

import math

from fabric.errors import Overloaded


class Ewma:
    """An exponentially weighted mean; None until the first sample."""

    def __init__(self, weight: float = 0.3):
        self.weight, self.value = weight, None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.weight * sample + (1 - self.weight) * self.value


def expected_finish_s(in_system: int, servers: int, service_s: float | None, before_s: float = 0.0) -> float | None:
    """Seconds until a request arriving now would finish; None when nothing has been measured yet."""
    if service_s is None or servers < 1:
        return None
    ahead = in_system - servers + 1  # departures needed before it starts
    return before_s + (max(0, math.ceil(ahead / servers)) + 1) * service_s


def refuse_if_late(expected_s: float | None, remaining_s: float | None, busy: str) -> None:
    """RESOURCE_EXHAUSTED, with the wait as the retry hint, when `expected_s` passes the caller's deadline.
    `busy` says what is in the way, e.g. "the generator has 1 running and 3 waiting"."""
    if remaining_s is None or expected_s is None or expected_s <= remaining_s:
        return
    left = max(0.0, remaining_s)
    raise Overloaded(f"{busy}: ~{expected_s:.1f}s to finish one more, more than the {left:.1f}s left to the "
                     "caller; retry later", retry_after_s=max(0.5, expected_s - left))
