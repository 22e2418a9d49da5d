"""What this process uses, read from /proc without a library (Linux; zero elsewhere)."""

from __future__ import annotations

import os


def rss_bytes() -> int:
    """Resident memory of this process (Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
