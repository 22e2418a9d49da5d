"""Derives the store's in-memory state (the HNSW index and the label filters) from SQLite: from
the newest usable snapshot plus a replay of what came after it, or from every row.

The index is derived. Each row records the sequence number (`seq`) of the transaction
that last wrote it, and each label taken out of the index leaves a tombstone with its
`seq`. A snapshot (indexer/snapshots.py) covers every write up to its sequence, so
opening the store loads the newest snapshot that verifies and replays only what came
after it: tombstones with a larger `seq` mark their labels deleted, rows with a larger
`seq` are updated in place or added. With no usable snapshot the index is rebuilt from
every row. Tombstones up to the oldest kept snapshot are pruned: no snapshot that could
still be loaded needs them. Labels come from an AUTOINCREMENT key, so a deleted label is
never handed out again and a snapshot can never mistake a new row for an old one.
Snapshots are an optimisation of restart time only: losing all of them loses nothing.
"""

from __future__ import annotations

import logging
import sqlite3
import time

import numpy as np

from indexer.filters import LabelFilters
from indexer.records import decode_json
from indexer.snapshots import Manifest, SnapshotDir
from indexer.sql import READ_BATCH
from indexer.vectors import VectorIndex, doubled

log = logging.getLogger(__name__)


class IndexLoader:
    """Builds the index and filters of one store from its database and snapshot folder."""

    def __init__(
        self,
        db: sqlite3.Connection,
        snapshots: SnapshotDir,
        dimension: int,
        *,
        m: int,
        ef_construction: int,
        initial_capacity: int,
    ):
        self._db = db
        self._snapshots = snapshots
        self._dimension = dimension
        self._m = m
        self._ef_construction = ef_construction
        self._initial_capacity = initial_capacity

    def open(self, store_id: int, sequence: int) -> tuple[VectorIndex, Manifest | None]:
        """The newest snapshot that verifies plus a replay of what came after it; else a full rebuild.

        `store_id` and `sequence` are the database's: a snapshot of another store, or one
        newer than the database, is not used. Unusable snapshots are deleted.
        """
        (count,) = self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()
        for manifest in self._snapshots.manifests():
            problem = self._unusable(manifest, store_id, sequence)
            if problem is None:
                started = time.perf_counter()
                try:
                    index = VectorIndex.load(self._snapshots.index_path(manifest), self._dimension, manifest.live)
                    replayed = self._replay(index, manifest.sequence)
                except (RuntimeError, ValueError, MemoryError) as exc:
                    problem = f"hnswlib cannot load it: {exc}"
                else:
                    if index.live == count:
                        log.info("loaded snapshot at sequence %d and replayed %d changes in %.2fs",
                                 manifest.sequence, replayed, time.perf_counter() - started)
                        return index, manifest
                    problem = f"it holds {index.live} live chunks after replay, SQLite {count}"
            log.warning("snapshot at sequence %d is unusable (%s): deleting it", manifest.sequence, problem)
            self._snapshots.discard(manifest)
        started = time.perf_counter()
        index = self.build()
        if count:
            log.info("rebuilt the index of %d chunks from SQLite in %.2fs", count, time.perf_counter() - started)
        return index, None

    def build(self) -> VectorIndex:
        """A fresh index over every chunk in SQLite."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()
        index = VectorIndex.empty(
            self._dimension, doubled(self._initial_capacity, count), self._m, self._ef_construction
        )
        cursor = self._db.execute("SELECT label, vector FROM vectors ORDER BY label")
        while rows := cursor.fetchmany(READ_BATCH):
            labels = np.fromiter((label for label, _ in rows), dtype=np.uint64, count=len(rows))
            vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), -1)
            index.add(labels, vectors)
        return index

    def filters(self) -> LabelFilters:
        """The tenant, source and tags of every chunk in SQLite, by label."""
        filters = LabelFilters()
        for label, tenant, source, tags in self._db.execute("SELECT label, tenant, source, tags FROM chunks"):
            filters.add(label, tenant, source, decode_json(tags))
        return filters

    def _unusable(self, manifest: Manifest, store_id: int, sequence: int) -> str | None:
        if manifest.store_id != store_id:
            return "taken from another store"
        if manifest.dimension != self._dimension:
            return f"dimension {manifest.dimension}"
        if manifest.sequence > sequence:
            return f"newer than the database (sequence {sequence})"
        return self._snapshots.verify(manifest)

    def _replay(self, index: VectorIndex, since: int) -> int:
        """Applies to a snapshot's index every change after its sequence. Returns how many."""
        removed = [label for (label,) in self._db.execute("SELECT label FROM tombstones WHERE seq > ?", (since,))]
        index.remove(removed)
        held = index.labels()
        changed = 0
        cursor = self._db.execute(
            "SELECT label, vector FROM chunks JOIN vectors USING (label) WHERE seq > ? ORDER BY label", (since,)
        )
        while rows := cursor.fetchmany(READ_BATCH):
            labels = np.fromiter((label for label, _ in rows), dtype=np.uint64, count=len(rows))
            vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), -1)
            old = np.fromiter((int(label) in held for label in labels), dtype=bool, count=len(rows))
            index.update(labels[old], vectors[old])
            index.add(labels[~old], vectors[~old])
            changed += len(rows)
        return len(removed) + changed


def prune_tombstones(db: sqlite3.Connection, upto: int) -> None:
    """Deletes the tombstones up to `upto`, the sequence of the oldest kept snapshot (in the
    caller's transaction): no snapshot that could still be loaded needs them."""
    db.execute("DELETE FROM tombstones WHERE seq <= ?", (upto,))
