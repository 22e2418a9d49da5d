"""One shard: SQLite is the log and the source of truth; the in-memory HNSW index is derived.

ShardStore is the facade: it owns the SQLite connection, the index, the label filters and
the shard's counters, decides where each transaction begins and ends, and delegates the
work to the modules beside it:

  indexer/sql.py         connections (WAL, synchronous=FULL: durability), transactions
  indexer/schema.py      the SQLite layout, its upgrades and the meta row
  indexer/records.py     the value types taken and returned here, and chunk validation
  indexer/writes.py      what a write does (the newer version wins: a log replay is harmless),
                         and its mirroring into the index
  indexer/reads.py       nearest-neighbour, exact and lexical search, payloads, counts
  indexer/logapply.py    the shard log's entries applied (documents written whole, deleted)
  indexer/recovery.py    the index from a snapshot plus a replay, or from every row
  indexer/snapshots.py   the snapshot files themselves

Tenants. Chunk and document ids are scoped by tenant ("" is the default tenant, itself a
tenant): every read and write names one tenant and touches nothing outside it.

Not thread-safe: hnswlib must not add while it searches and the SQLite connection belongs
to the thread that opened it, so every call must come from one thread, except `hits`
(which reads through a connection of its caller's thread) and `publish_snapshot` (which
touches only snapshot files).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence, Set
from pathlib import Path

import numpy as np

from fabric.errors import InvalidArgument
from indexer import lexical, logapply, reads, schema, writes
from indexer.logapply import LogRecord
from indexer.payloads import PayloadCache
from indexer.filters import SearchFilter
from indexer.procfs import rss_bytes
from indexer.records import (
    ChunkRecord,
    ClearedDocument,
    HitRecord,
    ShardStats,
    WriteResult,
    check_name,
    validate_chunks,
)
from indexer.recovery import IndexLoader, prune_tombstones
from indexer.schema import DB_FILE
from indexer.snapshots import FOLDER as SNAPSHOT_FOLDER
from indexer.snapshots import Manifest, SnapshotDir, Staged
from indexer.sql import Readers, connect, transaction
from indexer.vectors import Neighbours

__all__ = [
    "DB_FILE", "ChunkRecord", "ClearedDocument", "HitRecord", "ShardStats", "ShardStore", "WriteResult",
]

log = logging.getLogger(__name__)


class ShardStore:
    """The chunks of one shard under `data_dir`, searchable by cosine similarity."""

    def __init__(
        self,
        data_dir: Path,
        dimension: int,
        *,
        m: int = 16,
        ef_construction: int = 200,
        initial_capacity: int = 1024,
        snapshots_kept: int = 2,
        exact_search_max: int = 2048,
        payload_cache: int = 100_000,
    ):
        if dimension <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        self.data_dir = Path(data_dir)
        self.dimension = dimension
        #: Filtered searches allowing at most this many chunks are answered exactly, by brute force.
        self.exact_search_max = exact_search_max
        #: Chunks written or removed since the last snapshot was taken.
        self.unsnapshotted = 0
        #: Payloads of chunks found lately, by label (at most `payload_cache` of them).
        self.payloads = PayloadCache(payload_cache)

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._readers = Readers(self.data_dir / DB_FILE)
        self._db = connect(self.data_dir / DB_FILE)
        try:
            with transaction(self._db):
                upgraded = schema.create(self._db, self.data_dir / DB_FILE)
                lexical.ensure(self._db)
                meta = schema.load_meta(self._db, dimension, self.data_dir)
            self.sequence: int = meta.sequence
            self.max_version: int = meta.max_version
            #: Tells this store from any other, including one recreated in the same folder.
            self.store_id: int = meta.store_id
            #: The shard log's sequence applied here.
            self.log_sequence: int = meta.log_sequence
            self._snapshots = SnapshotDir(self.data_dir / SNAPSHOT_FOLDER, keep=snapshots_kept)
            self._snapshots.sweep()
            if upgraded:  # snapshots of an earlier layout are not trusted: one rebuild, then new ones
                for manifest in self._snapshots.manifests():
                    self._snapshots.discard(manifest)
            self._loader = IndexLoader(
                self._db, self._snapshots, dimension,
                m=m, ef_construction=ef_construction, initial_capacity=max(1, initial_capacity),
            )
            self._index, self.snapshot = self._loader.open(self.store_id, self.sequence)
            self._filters = self._loader.filters()
        except BaseException:
            self._db.close()
            raise

    # ----------------------------------------------------------------- writes

    def upsert(
        self, chunks: Sequence[ChunkRecord], replace_documents: bool = False, version: int | None = None
    ) -> WriteResult:
        """Writes `chunks` (all of one tenant), replacing older versions with the same chunk_id in place.

        With `replace_documents`, the chunks of every document named in `chunks` that are older
        than this write and not rewritten by it are removed in the same transaction.
        """
        vectors = validate_chunks(chunks, self.dimension, one_tenant=True)
        tenant = chunks[0].tenant if chunks else ""
        with transaction(self._db):
            version = writes.stamp_version(version, self.max_version)
            sequence = self.sequence + 1
            removed: list[writes.Row] = []
            if replace_documents:
                documents = dict.fromkeys(c.document_id for c in chunks)
                removed, _ = writes.clear(
                    self._db,
                    [ClearedDocument(tenant, document_id, version) for document_id in documents],
                    sequence,
                    keep={(tenant, c.chunk_id) for c in chunks},
                )
            written = writes.put(self._db, [(c, vectors[i], version) for i, c in enumerate(chunks)], sequence)
            self._advance(sequence, version)
        self._apply(removed, written)
        return WriteResult(len(chunks) - written.skipped, len(removed), written.skipped, sequence, version)

    def upsert_with_previous(
        self, chunks: Sequence[ChunkRecord], replace_documents: bool = False, version: int | None = None
    ) -> tuple[dict[str, int], WriteResult]:
        """`upsert`, plus the chunks each document named in `chunks` held just before it.

        One call on the store's thread, so no other write can land between the count and the upsert.
        """
        tenant = chunks[0].tenant if chunks else ""
        previous = self.chunk_counts(list(dict.fromkeys(c.document_id for c in chunks)), tenant)
        return previous, self.upsert(chunks, replace_documents, version)

    def delete(self, document_ids: Sequence[str], tenant: str = "", version: int | None = None) -> WriteResult:
        """Removes the chunks of `document_ids` in `tenant` older than this delete."""
        for i, document_id in enumerate(document_ids):
            if not document_id:
                raise InvalidArgument(f"document_ids[{i}]", "must not be empty")
        check_name("tenant", tenant)
        with transaction(self._db):
            version = writes.stamp_version(version, self.max_version)
            sequence = self.sequence + 1
            marks = [ClearedDocument(tenant, d, version) for d in dict.fromkeys(document_ids)]
            removed, _ = writes.clear(self._db, marks, sequence, keep=set())
            self._advance(sequence, version)
        self._apply(removed, writes.Written())
        return WriteResult(0, len(removed), 0, sequence, version)

    def apply_log(self, records: Sequence[LogRecord], through: int) -> int:
        """Applies the shard log's entries, in stream order, and records `through` (the last stream
        sequence they cover) as applied, in one transaction: a crash keeps all of it or none, and the
        next start resumes after the last batch that committed. Returns the chunks written or removed."""
        if through <= self.log_sequence:
            return 0
        applied: list[logapply.Applied] = []
        with transaction(self._db):
            sequence = self.sequence + 1
            for record in records:
                if record.sequence > self.log_sequence:
                    applied.append(logapply.apply(self._db, record, sequence, self.dimension))
            changed = sum(a.changed for a in applied)
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'log_sequence'", (through,))
            if changed:
                self._advance(sequence, through)
        self.log_sequence = through
        for a in applied:  # in order: a chunk written then removed in one batch ends removed
            self._apply(a.removed, a.written)
        return changed

    # ------------------------------------------------------------------ reads

    def search(
        self, queries: np.ndarray, k: int, ef: int = 64, where: SearchFilter | None = None
    ) -> list[list[HitRecord]]:
        """The `k` nearest chunks `where` allows for each query row, best first.

        Fewer than `k` hits come back only when fewer than `k` chunks are allowed.
        """
        where = where or SearchFilter()
        return self.hits(self.nearest(queries, k, ef, where), where.tenant)

    def quick_search(
        self, queries: np.ndarray, k: int, ef: int, where: SearchFilter | None = None
    ) -> list[list[HitRecord]] | None:
        """`search` from the index and the payloads alone, or None where it needs more: a filter that
        narrows the index (a Python callable inside hnswlib, or an exact search through the store's
        connection), or a query hnswlib could not fill. Same results as `search` otherwise.

        May run on any thread, provided no other call of this store runs meanwhile (the caller's
        lock): it touches no SQLite connection but the calling thread's reader (payloads missing
        from the cache)."""
        where = where or SearchFilter()
        queries = reads.check_queries(queries, k, self.dimension)
        allowed = self._filters.allowed(where)
        if len(allowed) != self._index.live:
            return None
        neighbours = reads.indexed(self._index, allowed, queries, k, ef)
        if any(found is None for found in neighbours):
            return None
        return self.hits(neighbours, where.tenant)

    def nearest(self, queries: np.ndarray, k: int, ef: int, where: SearchFilter) -> list[Neighbours]:
        """The first half of `search`: the labels of the nearest allowed chunks, on the store's thread."""
        queries = reads.check_queries(queries, k, self.dimension)
        allowed = self._filters.allowed(where)
        return reads.nearest(self._db, self._index, allowed, queries, k, ef, self.exact_search_max)

    def hits(self, neighbours: list[Neighbours], tenant: str) -> list[list[HitRecord]]:
        """The second half of `search`: the chunks behind the labels `nearest` found in `tenant`.

        Reads through a connection of the calling thread's own, so it may run on any thread,
        concurrently with the store's: the store's thread goes on to the next search meanwhile.
        A chunk deleted in between is left out.
        """
        return reads.hits(self._readers, neighbours, tenant, self.payloads)

    @property
    def live_chunks(self) -> int:
        """Chunks the index holds now (no query: read by the metrics endpoint)."""
        index = self._index
        return index.live if index is not None else 0

    def lexical_search(self, queries: Sequence[str], k: int, where: SearchFilter | None = None) -> list[list[HitRecord]]:
        """The `k` chunks `where` allows that best match each query's words (BM25), best first."""
        where = where or SearchFilter()
        if k <= 0:
            raise InvalidArgument("k", "must be positive")
        allowed = self._filters.allowed(where)
        return reads.lexical_hits(self._db, self._readers, allowed, queries, k, where.tenant, self.payloads)

    def allowed(self, where: SearchFilter) -> Set[int]:
        """The labels `where` lets through, for `lexical_search_of` (a set the store keeps: read it, never change it)."""
        return self._filters.allowed(where)

    def lexical_search_of(
        self, allowed: Set[int], queries: Sequence[str], k: int, tenant: str
    ) -> list[list[HitRecord]]:
        """`lexical_search` among labels `allowed` returned, through the calling thread's own connection:
        any thread may run it, beside the store's (a label removed meanwhile is left out, as in `hits`)."""
        if k <= 0:
            raise InvalidArgument("k", "must be positive")
        return reads.lexical_hits(self._readers.connection(), self._readers, allowed, queries, k, tenant, self.payloads)

    def chunk_counts(self, document_ids: Sequence[str], tenant: str = "") -> dict[str, int]:
        """Chunks held for each of `document_ids` in `tenant` (0 for documents not here)."""
        return reads.chunk_counts(self._db, document_ids, tenant)

    def stats(self) -> ShardStats:
        documents, tombstones = reads.stored_counts(self._db)
        return ShardStats(
            live_chunks=self._index.live,
            documents=documents,
            dimension=self.dimension,
            sequence=self.sequence,
            capacity=self._index.capacity,
            deleted_chunks=self._index.deleted,
            tenants=self._filters.tenants(),
            max_version=self.max_version,
            store_id=self.store_id,
            tombstones=tombstones,
            snapshot_sequence=self.snapshot.sequence if self.snapshot else None,
            snapshot_age_s=max(0.0, time.time() - self.snapshot.created) if self.snapshot else None,
            index_bytes=self._index.memory_bytes(),
            log_sequence=self.log_sequence,
            rss_bytes=rss_bytes(),
        )

    # -------------------------------------------------------------- snapshots

    def stage_snapshot(self) -> Staged | None:
        """Saves the index for a snapshot covering every write so far; None when the newest already does.

        Hand the result to `publish_snapshot` (any thread), then `snapshot_published` (this one).
        """
        if self.snapshot is not None and self.snapshot.sequence == self.sequence:
            return None
        staged = self._snapshots.stage(self.sequence, self.store_id, self.dimension, self._index.live)
        self._index.save(staged.path)
        self.unsnapshotted = 0
        return staged

    def publish_snapshot(self, staged: Staged) -> Manifest:
        """Makes a staged snapshot durable and current. Touches only snapshot files: any thread may run it."""
        return self._snapshots.publish(staged)

    def snapshot_published(self, manifest: Manifest) -> None:
        """Adopts a published snapshot and prunes the tombstones no kept snapshot needs."""
        if self.snapshot is None or manifest.sequence > self.snapshot.sequence:
            self.snapshot = manifest
        oldest = min(m.sequence for m in self._snapshots.manifests())
        with transaction(self._db):
            prune_tombstones(self._db, oldest)

    def take_snapshot(self) -> Manifest | None:
        """Stages, publishes and adopts a snapshot on this thread."""
        staged = self.stage_snapshot()
        if staged is None:
            return None
        manifest = self.publish_snapshot(staged)
        self.snapshot_published(manifest)
        return manifest

    def close(self) -> None:
        """Closes the store; no other thread may be reading any more."""
        self._readers.close()
        self._db.close()

    # ---------------------------------------------------------------- helpers

    def _advance(self, sequence: int, version: int) -> None:
        """Moves the shard to `sequence`, having seen `version` (in the write's transaction)."""
        writes.advance(self._db, sequence, version)
        self.sequence = sequence
        self.max_version = max(self.max_version, version)

    def _apply(self, removed: Sequence[writes.Row], written: writes.Written) -> None:
        """Mirrors a committed write into the index, the filters and the payload cache; rebuilds the
        index and the filters from SQLite should that fail."""
        # First, and before the write's call returns: no search may see a removed or rewritten
        # chunk's cached payload once the write is acknowledged.
        self.payloads.invalidate([row.label for row in removed] + [new.label for _, new, _ in written.updated])
        try:
            writes.mirror(self._index, self._filters, removed, written)
        except Exception:
            log.exception("index update failed after commit: rebuilding the index from SQLite")
            self._index = self._loader.build()
            self._filters = self._loader.filters()
            self.payloads.clear()
            raise
        finally:
            self.unsnapshotted += len(removed) + len(written.added) + len(written.updated)
