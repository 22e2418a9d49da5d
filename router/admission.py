"""Admission control: a bounded number of requests in flight; past it, RESOURCE_EXHAUSTED at once."""

from __future__ import annotations

from contextlib import contextmanager

from fabric.errors import Overloaded


class Admission:
    def __init__(self, limit: int, retry_after_s: float = 0.5):
        if limit < 1:
            raise ValueError("the admission limit must be positive")
        self.limit, self.retry_after_s = limit, retry_after_s
        self.inflight = 0

    @contextmanager
    def admit(self):
        """Holds one of `limit` places for the duration of the block, or refuses with a retry hint."""
        if self.inflight >= self.limit:
            raise Overloaded(f"router has {self.inflight} requests in flight; retry shortly",
                             retry_after_s=self.retry_after_s)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
