"""An in-memory LRU of chunk payloads by label, in front of SQLite's `chunks` table.

A search's hits are mostly the same few chunks again and again; their payloads (ids, text,
source, metadata, tags) are kept here so that a search reads SQLite only for labels it has
not seen lately.

Correctness rests on two rules:
  * every committed write calls `invalidate` with each label it removed or rewrote in place
    (labels are never reused: a new chunk gets a new label, which the cache cannot hold yet),
    before the write's call returns (read your writes);
  * a reader that missed puts what it read from SQLite back only if no write invalidated
    anything since it looked (`generation`): a row read just before a commit could otherwise
    be put back after that commit's invalidation and serve a deleted or replaced chunk.

Thread-safe: the store's thread writes and searches, reader threads may search beside it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from indexer.records import Payload


class PayloadCache:
    def __init__(self, capacity: int):
        self.capacity = max(0, capacity)
        self._entries: OrderedDict[int, Payload] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, labels: Iterable[int]) -> tuple[dict[int, Payload], list[int], int]:
        """(payloads found by label, labels missing, the generation to hand back to `store`)."""
        found: dict[int, Payload] = {}
        missing: list[int] = []
        entries = self._entries
        with self._lock:
            for label in labels:
                payload = entries.get(label)
                if payload is None:
                    missing.append(label)
                else:
                    entries.move_to_end(label)
                    found[label] = payload
            generation = self._generation
        self.hits += len(found)
        self.misses += len(missing)
        return found, missing, generation

    def store(self, payloads: dict[int, Payload], generation: int) -> None:
        """Keeps payloads read from SQLite after `lookup` returned `generation`, unless a write
        invalidated anything since (what was read may be older than that write)."""
        if not self.capacity or not payloads:
            return
        entries = self._entries
        with self._lock:
            if generation != self._generation:
                return
            entries.update(payloads)
            while len(entries) > self.capacity:
                entries.popitem(last=False)

    def invalidate(self, labels: Iterable[int]) -> None:
        """Forgets `labels` (removed or rewritten by a committed write)."""
        entries = self._entries
        with self._lock:
            self._generation += 1
            for label in labels:
                entries.pop(label, None)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
