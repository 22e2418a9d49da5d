"""The shard's in-memory HNSW index (hnswlib, cosine): labels in, nearest labels out.

Not thread-safe: hnswlib must not add while it searches, so one thread owns an index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import hnswlib
import numpy as np

from fabric.resources import usable_cpus

#: (labels, cosine distances) of one query, nearest first; None where hnswlib could not fill k.
Neighbours = tuple[np.ndarray, np.ndarray] | None

# hnswlib's per-element overheads beyond the level-0 block (see hnswalg.h): a link-list mutex,
# the level and upper-layer pointer, and the label → slot hash map entry.
_MUTEX_BYTES = 40
_ELEMENT_BOOKKEEPING = 4 + 8
_LABEL_MAP_ENTRY = 48
_LABEL_OP_LOCKS = 65536 * _MUTEX_BYTES


class VectorIndex:
    """hnswlib plus the bookkeeping it lacks: live count, growth by doubling, memory estimate."""

    def __init__(self, index: hnswlib.Index, live: int):
        self._index = index
        self.live = live
        # hnswlib would take the host's core count, not the CPUs this process may use (cgroup quota).
        index.set_num_threads(usable_cpus())

    @classmethod
    def empty(cls, dimension: int, capacity: int, m: int, ef_construction: int) -> "VectorIndex":
        index = hnswlib.Index(space="cosine", dim=dimension)
        index.init_index(max_elements=max(1, capacity), ef_construction=ef_construction, M=m, allow_replace_deleted=True)
        return cls(index, 0)

    @classmethod
    def load(cls, path: Path, dimension: int, live: int) -> "VectorIndex":
        """An index saved by `save`; `live` is the number of its labels not marked deleted."""
        index = hnswlib.Index(space="cosine", dim=dimension)
        index.load_index(str(path), allow_replace_deleted=True)
        return cls(index, live)

    def save(self, path: Path) -> None:
        self._index.save_index(str(path))

    # ----------------------------------------------------------------- writes

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Adds new labels, reusing the slots of deleted ones first and growing when full."""
        if not len(labels):
            return
        needed = max(self._index.get_current_count(), self.live + len(labels))
        if needed > self._index.get_max_elements():
            self._index.resize_index(doubled(self._index.get_max_elements(), needed))
        self._index.add_items(vectors, labels, replace_deleted=True)
        self.live += len(labels)

    def update(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Gives existing labels new vectors in place. replace_deleted must stay off here: it
        would move the label to a vacant slot and orphan its old one."""
        if len(labels):
            self._index.add_items(vectors, labels)

    def remove(self, labels: Sequence[int]) -> int:
        """Marks labels deleted, skipping those the index does not hold. Returns how many it held."""
        removed = 0
        for label in labels:
            try:
                self._index.mark_deleted(int(label))
            except RuntimeError:  # not here (added and removed after a snapshot) or already deleted
                continue
            removed += 1
        self.live -= removed
        return removed

    # ------------------------------------------------------------------ reads

    def knn(
        self, queries: np.ndarray, k: int, ef: int, allowed: Callable[[int], bool] | None = None
    ) -> list[Neighbours]:
        """The k nearest allowed labels of each query, or None for a query hnswlib could not fill.

        hnswlib refuses a whole batch when one query reaches fewer than k labels (deletions can
        cut the graph; a filter may let few through); such queries are retried alone with a
        wider search, and those still short are left to the caller.
        """
        # A Python filter is called with the GIL held: threads would only fight over it.
        threads = 1 if allowed is not None else -1
        self._index.set_ef(max(ef, k))
        try:
            return list(zip(*self._index.knn_query(queries, k=k, num_threads=threads, filter=allowed)))
        except RuntimeError:
            pass
        results: list[Neighbours] = []
        for query in queries:
            found = None
            for breadth in dict.fromkeys((max(ef, k), min(max(self.live, k), max(4 * ef, 1024)))):
                self._index.set_ef(breadth)
                try:
                    labels, distances = self._index.knn_query(query, k=k, num_threads=1, filter=allowed)
                except RuntimeError:
                    continue
                found = (labels[0], distances[0])
                break
            results.append(found)
        return results

    # ------------------------------------------------------------------ state

    def labels(self) -> set[int]:
        """Every label the index holds, those marked deleted included."""
        return set(self._index.get_ids_list())

    @property
    def capacity(self) -> int:
        return self._index.get_max_elements()

    @property
    def slots(self) -> int:
        """Slots in use, live or marked deleted (deleted ones are reused by later adds)."""
        return self._index.get_current_count()

    @property
    def deleted(self) -> int:
        return self.slots - self.live

    def memory_bytes(self) -> int:
        """An estimate of what hnswlib holds in memory, from its own layout (hnswalg.h)."""
        m, dimension = self._index.M, self._index.dim
        level0 = (2 * m * 4 + 4) + dimension * 4 + 8  # links, vector, label per slot
        upper = (m * 4 + 4) / max(1, m - 1)  # an element reaches level l with probability m**-l
        per_slot = level0 + _MUTEX_BYTES + _ELEMENT_BOOKKEEPING
        return int(self.capacity * per_slot + self.slots * (upper + _LABEL_MAP_ENTRY) + _LABEL_OP_LOCKS)


def doubled(capacity: int, needed: int) -> int:
    """`capacity` doubled until it holds `needed`."""
    while capacity < needed:
        capacity *= 2
    return capacity
