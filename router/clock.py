"""Stage timings of one request, in milliseconds."""

from __future__ import annotations

import time


class Clock:
    def __init__(self):
        self.start = time.perf_counter()
        self.mark = self.start

    def lap(self) -> float:
        """Milliseconds since the last lap (or the start)."""
        now = time.perf_counter()
        elapsed, self.mark = (now - self.mark) * 1000, now
        return elapsed

    def total(self) -> float:
        return (time.perf_counter() - self.start) * 1000
