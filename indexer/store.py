"""One shard: SQLite is the log and the source of truth; the in-memory HNSW index is derived.

Durability. An Upsert or Delete is acknowledged only after its transaction has COMMITted,
and the connection runs in WAL mode with synchronous=FULL: COMMIT appends the
transaction's pages to the write-ahead log and fsyncs the log before it returns. A crash
at any instant therefore keeps a transaction whole or loses one that was never
acknowledged (WAL frames carry checksums and a commit marker, and recovery drops a torn
tail). Nothing acknowledged lives only in memory.

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

Convergence of replicas. Every write carries a version (the router's, or one stamped
here: max(highest version seen + 1, wall-clock microseconds)). Rows keep the version
that wrote them, and a document deleted or replaced at version V keeps a mark "cleared
at V". A write applies only where it is newer: a chunk is written when its version is
above the row's and not below its document's mark; clearing a document at V removes its
chunks older than V. So applying the same change twice, or two changes in either order,
ends in the same state (last writer wins per chunk and per document), which is what lets
replicas repair each other by exchanging changes (`changes` / `apply_changes`).

Tenants. Chunk and document ids are scoped by tenant ("" is the default tenant, itself a
tenant): every read and write names one tenant and touches nothing outside it.

Not thread-safe: hnswlib must not add while it searches and the SQLite connection belongs
to the thread that opened it, so every call must come from one thread, except `hits`
(which reads through a connection of its caller's thread) and `publish_snapshot` (which
touches only snapshot files).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer import lexical
from indexer.filters import LabelFilters, SearchFilter
from indexer.snapshots import FOLDER as SNAPSHOT_FOLDER
from indexer.snapshots import Manifest, SnapshotDir, Staged
from indexer.vectors import Neighbours, VectorIndex, doubled
from mesh.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

DB_FILE = "chunks.sqlite3"

# Keeps every `IN (...)` list well under SQLite's bound-parameter limit.
_SQL_BATCH = 500
# Rows read at a time while rebuilding or replaying the index, or searching exactly.
_READ_BATCH = 10_000
_MMAP_BYTES = 1 << 32
_MAX_TAGS = 64
_MAX_NAME = 256

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
    # AUTOINCREMENT: a label is never reused, since hnswlib (or a snapshot) may still hold a deleted one.
    """CREATE TABLE IF NOT EXISTS chunks (
        label       INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant      TEXT NOT NULL,
        chunk_id    TEXT NOT NULL,
        document_id TEXT NOT NULL,
        text        TEXT NOT NULL,
        source      TEXT NOT NULL,
        metadata    TEXT NOT NULL,
        tags        TEXT NOT NULL,
        version     INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        UNIQUE (tenant, chunk_id)
    )""",
    # Vectors apart from the rows, so that looking up the payloads of hits reads small rows.
    """CREATE TABLE IF NOT EXISTS vectors (
        label  INTEGER PRIMARY KEY,
        vector BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS chunks_by_tenant_document ON chunks (tenant, document_id)",
    "CREATE INDEX IF NOT EXISTS chunks_by_seq ON chunks (seq)",
    # A document deleted or replaced at `version`: its chunks older than that are gone and stay gone.
    """CREATE TABLE IF NOT EXISTS cleared_documents (
        tenant      TEXT NOT NULL,
        document_id TEXT NOT NULL,
        version     INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        PRIMARY KEY (tenant, document_id)
    )""",
    "CREATE INDEX IF NOT EXISTS cleared_documents_by_seq ON cleared_documents (seq)",
    # Labels taken out of the index at `seq`, replayed onto snapshots older than that.
    """CREATE TABLE IF NOT EXISTS tombstones (
        label INTEGER PRIMARY KEY,
        seq   INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS tombstones_by_seq ON tombstones (seq)",
    # How far this shard has applied each peer replica's changes (its store and sequence).
    """CREATE TABLE IF NOT EXISTS peer_cursors (
        peer     TEXT PRIMARY KEY,
        store_id INTEGER NOT NULL,
        sequence INTEGER NOT NULL
    )""",
)

# Version given to rows written before versions existed: older than any later write.
_FIRST_VERSION = 1


@dataclass
class ChunkRecord:
    """A chunk to write; `vector` must have the shard's dimension."""

    chunk_id: str
    document_id: str
    vector: np.ndarray | Sequence[float]
    text: str = ""
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    tenant: str = ""
    tags: Sequence[str] = ()


@dataclass
class HitRecord:
    """A chunk found by a search; `score` is the cosine similarity to the query."""

    chunk_id: str
    document_id: str
    score: float
    text: str
    source: str
    metadata: dict[str, str]
    tenant: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WriteResult:
    #: Chunks written.
    written: int
    #: Chunks removed (deleted documents, or chunks a replaced document no longer has).
    removed: int
    #: Chunks not written because this shard holds a newer version of them or their document.
    skipped: int
    #: The shard's sequence number after the write.
    sequence: int
    #: The version the write carried.
    version: int


@dataclass(frozen=True)
class ClearedDocument:
    """Every chunk of the document older than `version` is gone."""

    tenant: str
    document_id: str
    version: int


@dataclass
class ChangePage:
    """Rows and document marks of a shard written after a point; see `ShardStore.changes`."""

    chunks: list[tuple[ChunkRecord, int]]
    cleared: list[ClearedDocument]
    #: Every change up to this sequence number of the sending store is in this page or an earlier one.
    sequence: int
    store_id: int
    #: True when the page reaches the store's sequence number at the time it was read.
    done: bool


@dataclass
class ShardStats:
    live_chunks: int
    documents: int
    dimension: int
    sequence: int
    #: Slots the HNSW index holds before it must grow.
    capacity: int
    #: Index slots of deleted chunks, reused by later writes.
    deleted_chunks: int
    tenants: int
    max_version: int
    store_id: int
    tombstones: int
    snapshot_sequence: int | None
    snapshot_age_s: float | None
    index_bytes: int
    rss_bytes: int


@dataclass(frozen=True)
class _Row:
    label: int
    tenant: str
    source: str
    tags: tuple[str, ...]


@dataclass
class _Written:
    added: list[tuple[_Row, np.ndarray]] = field(default_factory=list)
    #: (row as it was, row as it is now, new vector); the label stays.
    updated: list[tuple[_Row, _Row, np.ndarray]] = field(default_factory=list)
    skipped: int = 0


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
    ):
        if dimension <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        self.data_dir = Path(data_dir)
        self.dimension = dimension
        self._m = m
        self._ef_construction = ef_construction
        self._initial_capacity = max(1, initial_capacity)
        #: Filtered searches allowing at most this many chunks are answered exactly, by brute force.
        self.exact_search_max = exact_search_max
        #: Chunks written or removed since the last snapshot was taken.
        self.unsnapshotted = 0

        self._readers = threading.local()
        self._readers_lock = threading.Lock()
        self._reader_connections: list[sqlite3.Connection] = []

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are begun and committed explicitly in `_transaction`.
        self._db = sqlite3.connect(self.data_dir / DB_FILE, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Reads through a memory map: the payload lookups of every search skip read() and a copy.
            self._db.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
            with self._transaction():
                upgraded = self._create_schema()
                lexical.ensure(self._db)
                self._load_meta()
            self._snapshots = SnapshotDir(self.data_dir / SNAPSHOT_FOLDER, keep=snapshots_kept)
            self._snapshots.sweep()
            if upgraded:  # snapshots of an earlier layout are not trusted: one rebuild, then new ones
                for manifest in self._snapshots.manifests():
                    self._snapshots.discard(manifest)
            self._index, self.snapshot = self._open_index()
            self._filters = self._load_filters()
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
        vectors = self._validate(chunks, one_tenant=True)
        tenant = chunks[0].tenant if chunks else ""
        with self._transaction():
            version = self._version(version)
            sequence = self.sequence + 1
            removed: list[_Row] = []
            if replace_documents:
                documents = dict.fromkeys(c.document_id for c in chunks)
                removed, _ = self._clear(
                    [ClearedDocument(tenant, document_id, version) for document_id in documents],
                    sequence,
                    keep={(tenant, c.chunk_id) for c in chunks},
                )
            written = self._put([(c, vectors[i], version) for i, c in enumerate(chunks)], sequence)
            self._advance(sequence, version)
        self._apply(removed, written)
        return WriteResult(len(chunks) - written.skipped, len(removed), written.skipped, sequence, version)

    def delete(self, document_ids: Sequence[str], tenant: str = "", version: int | None = None) -> WriteResult:
        """Removes the chunks of `document_ids` in `tenant` older than this delete."""
        for i, document_id in enumerate(document_ids):
            if not document_id:
                raise InvalidArgument(f"document_ids[{i}]", "must not be empty")
        _check_name("tenant", tenant)
        with self._transaction():
            version = self._version(version)
            sequence = self.sequence + 1
            marks = [ClearedDocument(tenant, d, version) for d in dict.fromkeys(document_ids)]
            removed, _ = self._clear(marks, sequence, keep=set())
            self._advance(sequence, version)
        self._apply(removed, _Written())
        return WriteResult(0, len(removed), 0, sequence, version)

    def apply_changes(self, page: ChangePage, peer: str) -> int:
        """Applies a page of another replica's changes (last writer wins) and remembers how far
        this shard has come with `peer`. Returns the chunks written or removed."""
        vectors = self._validate([chunk for chunk, _ in page.chunks], one_tenant=False)
        with self._transaction():
            sequence = self.sequence + 1
            removed, raised = self._clear(page.cleared, sequence, keep={(c.tenant, c.chunk_id) for c, _ in page.chunks})
            written = self._put([(c, vectors[i], v) for i, (c, v) in enumerate(page.chunks)], sequence)
            changed = len(removed) + len(written.added) + len(written.updated)
            if changed or raised:
                versions = [v for _, v in page.chunks] + [c.version for c in page.cleared]
                self._advance(sequence, max(versions))
            self._db.execute(
                "INSERT OR REPLACE INTO peer_cursors (peer, store_id, sequence) VALUES (?, ?, ?)",
                (peer, page.store_id, page.sequence),
            )
        self._apply(removed, written)
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

    def nearest(self, queries: np.ndarray, k: int, ef: int, where: SearchFilter) -> list[Neighbours]:
        """The first half of `search`: the labels of the nearest allowed chunks, on the store's thread."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise InvalidArgument("queries", f"expected vectors of dimension {self.dimension}, got shape {queries.shape}")
        if not np.isfinite(queries).all():
            raise InvalidArgument("queries", "values must be finite")
        if k <= 0:
            raise InvalidArgument("k", "must be positive")
        allowed = self._filters.allowed(where)
        k = min(k, len(allowed))
        nothing = (np.empty(0, np.uint64), np.empty(0, np.float32))
        if k == 0 or len(queries) == 0:
            return [nothing for _ in range(len(queries))]

        everything = len(allowed) == self._index.live
        if not everything and len(allowed) <= self.exact_search_max:
            return self._exact(queries, k, allowed)
        neighbours = self._index.knn(queries, k, ef, None if everything else allowed.__contains__)
        short = [i for i, found in enumerate(neighbours) if found is None]
        if short:
            for i, found in zip(short, self._exact(queries[short], k, allowed)):
                neighbours[i] = found
        return neighbours

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
        ranked = [lexical.top(self._db, query, k, allowed) for query in queries]
        payloads = self._payloads(where.tenant, {label for found in ranked for label, _ in found})
        results = []
        for found in ranked:
            hits = []
            for label, score in found:
                payload = payloads.get(label)
                if payload is not None:
                    chunk_id, document_id, text, source, metadata, tags = payload
                    hits.append(HitRecord(chunk_id, document_id, score, text, source, metadata, where.tenant, tags))
            results.append(hits)
        return results

    def hits(self, neighbours: list[Neighbours], tenant: str) -> list[list[HitRecord]]:
        """The second half of `search`: the chunks behind the labels `nearest` found in `tenant`.

        Reads through a connection of the calling thread's own, so it may run on any thread,
        concurrently with the store's: the store's thread goes on to the next search meanwhile.
        A chunk deleted in between is left out.
        """
        payloads = self._payloads(tenant, {label for labels, _ in neighbours for label in labels.tolist()})
        results = []
        for labels, distances in neighbours:
            hits = []
            for label, distance in zip(labels.tolist(), distances.tolist()):
                payload = payloads.get(label)
                if payload is not None:
                    chunk_id, document_id, text, source, metadata, tags = payload
                    hits.append(HitRecord(chunk_id, document_id, 1.0 - distance, text, source, metadata, tenant, tags))
            results.append(hits)
        return results

    def chunk_counts(self, document_ids: Sequence[str], tenant: str = "") -> dict[str, int]:
        """Chunks held for each of `document_ids` in `tenant` (0 for documents not here)."""
        counts = dict.fromkeys(document_ids, 0)
        counts.update(
            self._select(
                "SELECT document_id, COUNT(*) FROM chunks WHERE tenant = ? AND document_id IN ({}) GROUP BY document_id",
                list(counts),
                tenant,
            )
        )
        return counts

    def changes(self, since_sequence: int = 0, since_version: int = 0, limit: int = 512) -> ChangePage:
        """Rows (with vectors) and document marks written after `since_sequence` of this store
        and with a version above `since_version`, in sequence order, about `limit` of each.

        Page on with the returned `sequence` until `done`. A row rewritten meanwhile moves to a
        later sequence, so it still comes, in its newest form.
        """
        limit = max(1, limit)
        bounds = [
            row[0]
            for table in ("chunks", "cleared_documents")
            for row in self._db.execute(
                f"SELECT seq FROM {table} WHERE seq > ? AND version > ? ORDER BY seq LIMIT 1 OFFSET ?",
                (since_sequence, since_version, limit - 1),
            )
        ]
        upto = min(bounds, default=self.sequence)
        rows = self._db.execute(
            """SELECT tenant, chunk_id, document_id, text, source, metadata, tags, vector, version
               FROM chunks JOIN vectors USING (label)
               WHERE seq > ? AND seq <= ? AND version > ? ORDER BY seq, label""",
            (since_sequence, upto, since_version),
        )
        chunks = [
            (
                ChunkRecord(chunk_id, document_id, np.frombuffer(vector, dtype=np.float32), text, source,
                            json.loads(metadata), tenant, json.loads(tags)),
                version,
            )
            for tenant, chunk_id, document_id, text, source, metadata, tags, vector, version in rows
        ]
        cleared = [
            ClearedDocument(*row)
            for row in self._db.execute(
                """SELECT tenant, document_id, version FROM cleared_documents
                   WHERE seq > ? AND seq <= ? AND version > ? ORDER BY seq""",
                (since_sequence, upto, since_version),
            )
        ]
        return ChangePage(chunks, cleared, max(upto, since_sequence), self.store_id, upto >= self.sequence)

    def peer_cursor(self, peer: str) -> tuple[int, int]:
        """(store id, sequence) up to which this shard has applied `peer`'s changes; (0, 0) if never."""
        row = self._db.execute("SELECT store_id, sequence FROM peer_cursors WHERE peer = ?", (peer,)).fetchone()
        return row or (0, 0)

    def stats(self) -> ShardStats:
        (documents,) = self._db.execute("SELECT COUNT(*) FROM (SELECT DISTINCT tenant, document_id FROM chunks)").fetchone()
        (tombstones,) = self._db.execute("SELECT COUNT(*) FROM tombstones").fetchone()
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
            rss_bytes=_rss_bytes(),
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
        with self._transaction():
            self._db.execute("DELETE FROM tombstones WHERE seq <= ?", (oldest,))

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
        with self._readers_lock:
            for reader in self._reader_connections:
                reader.close()
            self._reader_connections.clear()
        self._db.close()

    # ---------------------------------------------------------- write helpers

    def _version(self, given: int | None) -> int:
        if given is None:
            return max(self.max_version + 1, time.time_ns() // 1000)
        if given <= 0:
            raise InvalidArgument("version", "must be positive")
        return given

    def _advance(self, sequence: int, version: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'sequence'", (sequence,))
        self._db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'max_version'", (version,))
        self.sequence = sequence
        self.max_version = max(self.max_version, version)

    def _clear(
        self, marks: Iterable[ClearedDocument], sequence: int, keep: Collection[tuple[str, str]]
    ) -> tuple[list[_Row], int]:
        """Marks documents cleared at their versions and deletes their older chunks, except `keep`
        (tenant, chunk_id) pairs, which the caller rewrites. Returns (removed rows, marks raised)."""
        removed: list[_Row] = []
        raised = 0
        for mark in marks:
            raised += self._db.execute(
                """INSERT INTO cleared_documents (tenant, document_id, version, seq) VALUES (?, ?, ?, ?)
                   ON CONFLICT (tenant, document_id) DO UPDATE SET version = excluded.version, seq = excluded.seq
                   WHERE excluded.version > cleared_documents.version""",
                (mark.tenant, mark.document_id, mark.version, sequence),
            ).rowcount
            rows = self._db.execute(
                "SELECT label, chunk_id, source, tags FROM chunks WHERE tenant = ? AND document_id = ? AND version < ?",
                (mark.tenant, mark.document_id, mark.version),
            ).fetchall()
            removed += [
                _Row(label, mark.tenant, source, tuple(json.loads(tags)))
                for label, chunk_id, source, tags in rows
                if (mark.tenant, chunk_id) not in keep
            ]
        self._db.executemany("DELETE FROM chunks WHERE label = ?", ((row.label,) for row in removed))
        self._db.executemany("DELETE FROM vectors WHERE label = ?", ((row.label,) for row in removed))
        self._db.executemany("INSERT INTO tombstones (label, seq) VALUES (?, ?)", ((row.label, sequence) for row in removed))
        return removed, raised

    def _put(self, items: Sequence[tuple[ChunkRecord, np.ndarray, int]], sequence: int) -> _Written:
        """Writes each (chunk, vector, version) that is newer than what this shard holds."""
        written = _Written()
        by_tenant: dict[str, list[tuple[ChunkRecord, np.ndarray, int]]] = {}
        for item in items:
            by_tenant.setdefault(item[0].tenant, []).append(item)
        for tenant, group in by_tenant.items():
            existing = {
                chunk_id: (label, version, _Row(label, tenant, source, tuple(json.loads(tags))))
                for chunk_id, label, version, source, tags in self._select(
                    "SELECT chunk_id, label, version, source, tags FROM chunks WHERE tenant = ? AND chunk_id IN ({})",
                    [c.chunk_id for c, _, _ in group],
                    tenant,
                )
            }
            cleared = dict(
                self._select(
                    "SELECT document_id, version FROM cleared_documents WHERE tenant = ? AND document_id IN ({})",
                    list(dict.fromkeys(c.document_id for c, _, _ in group)),
                    tenant,
                )
            )
            fresh = [
                (c, vector, version)
                for c, vector, version in group
                if (c.chunk_id not in existing or existing[c.chunk_id][1] < version)
                and version >= cleared.get(c.document_id, 0)
            ]
            written.skipped += len(group) - len(fresh)
            self._db.executemany(
                """INSERT INTO chunks (tenant, chunk_id, document_id, text, source, metadata, tags, version, seq)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (tenant, chunk_id) DO UPDATE SET
                       document_id = excluded.document_id, text = excluded.text, source = excluded.source,
                       metadata = excluded.metadata, tags = excluded.tags, version = excluded.version,
                       seq = excluded.seq""",
                [
                    (tenant, c.chunk_id, c.document_id, c.text, c.source, json.dumps(c.metadata),
                     json.dumps(list(c.tags)), version, sequence)
                    for c, vector, version in fresh
                ],
            )
            labels = dict(
                self._select(
                    "SELECT chunk_id, label FROM chunks WHERE tenant = ? AND chunk_id IN ({})",
                    [c.chunk_id for c, _, _ in fresh],
                    tenant,
                )
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO vectors (label, vector) VALUES (?, ?)",
                [(labels[c.chunk_id], vector.tobytes()) for c, vector, _ in fresh],
            )
            for c, vector, _ in fresh:
                row = _Row(labels[c.chunk_id], tenant, c.source, tuple(c.tags))
                if c.chunk_id in existing:
                    written.updated.append((existing[c.chunk_id][2], row, vector))
                else:
                    written.added.append((row, vector))
        return written

    def _apply(self, removed: Sequence[_Row], written: _Written) -> None:
        """Mirrors a committed write into the index and the filters; rebuilds both from SQLite should that fail."""
        try:
            self._index.remove([row.label for row in removed])
            for row in removed:
                self._filters.remove(row.label, row.tenant, row.source, row.tags)
            if written.updated:
                self._index.update(
                    np.array([new.label for _, new, _ in written.updated], dtype=np.uint64),
                    np.stack([vector for _, _, vector in written.updated]),
                )
                for old, new, _ in written.updated:
                    self._filters.remove(old.label, old.tenant, old.source, old.tags)
                    self._filters.add(new.label, new.tenant, new.source, new.tags)
            if written.added:
                self._index.add(
                    np.array([row.label for row, _ in written.added], dtype=np.uint64),
                    np.stack([vector for _, vector in written.added]),
                )
                for row, _ in written.added:
                    self._filters.add(row.label, row.tenant, row.source, row.tags)
        except Exception:
            log.exception("index update failed after commit: rebuilding the index from SQLite")
            self._index = self._build_index()
            self._filters = self._load_filters()
            raise
        finally:
            self.unsnapshotted += len(removed) + len(written.added) + len(written.updated)

    # ----------------------------------------------------------- read helpers

    def _exact(self, queries: np.ndarray, k: int, labels: Set[int]) -> list[Neighbours]:
        """The k nearest of `labels` for each query by brute force, from the vectors in SQLite."""
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
        best_scores = np.empty((len(queries), 0), dtype=np.float32)
        best_labels = np.empty((len(queries), 0), dtype=np.uint64)
        ordered = sorted(labels)
        for start in range(0, len(ordered), _READ_BATCH):
            rows = list(self._select("SELECT label, vector FROM vectors WHERE label IN ({})", ordered[start : start + _READ_BATCH]))
            found = np.array([label for label, _ in rows], dtype=np.uint64)
            vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), -1)
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
            scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
            candidates = np.concatenate([best_labels, np.broadcast_to(found, (len(queries), len(found)))], axis=1)
            keep = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
            best_scores = np.take_along_axis(scores, keep, axis=1)
            best_labels = np.take_along_axis(candidates, keep, axis=1)
        order = np.argsort(-best_scores, axis=1)
        best_scores = np.take_along_axis(best_scores, order, axis=1)
        best_labels = np.take_along_axis(best_labels, order, axis=1)
        return [(best_labels[i], 1.0 - best_scores[i]) for i in range(len(queries))]

    def _payloads(self, tenant: str, labels: set[int]) -> dict[int, tuple]:
        """(chunk_id, document_id, text, source, metadata, tags) by label, through this thread's reader."""
        rows = self._select(
            "SELECT label, tenant, chunk_id, document_id, text, source, metadata, tags FROM chunks WHERE label IN ({})",
            list(labels),
            db=self._reader(),
        )
        # The tenant check repeats the filter that chose the labels: isolation twice over. (In SQL it
        # would lead SQLite to scan the tenant's index instead of looking labels up by key.)
        return {
            label: (chunk_id, document_id, text, source, _json(metadata), _json(tags))
            for label, row_tenant, chunk_id, document_id, text, source, metadata, tags in rows
            if row_tenant == tenant
        }

    # ---------------------------------------------------------------- opening

    def _create_schema(self) -> bool:
        """Creates the tables, upgrading an earlier layout in place. Returns whether it upgraded."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(chunks)")}
        if "vector" not in columns:  # a new store, or the current layout
            for statement in _SCHEMA:
                self._db.execute(statement)
            return False
        # Earlier layouts kept vectors in `chunks`, the first also lacked tenants, tags, versions and seq.
        log.info("upgrading %s to the current layout", self.data_dir / DB_FILE)
        self._db.execute("ALTER TABLE chunks RENAME TO chunks_old")
        for (index,) in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'chunks_old' AND sql IS NOT NULL"
        ).fetchall():
            self._db.execute(f'DROP INDEX "{index}"')
        for statement in _SCHEMA:
            self._db.execute(statement)
        sequence = "(SELECT value FROM meta WHERE key = 'sequence')"
        carried = {"tenant": "''", "tags": "'[]'", "version": str(_FIRST_VERSION), "seq": sequence}
        values = ", ".join(name if name in columns else default for name, default in carried.items())
        self._db.execute(
            f"""INSERT INTO chunks (label, chunk_id, document_id, text, source, metadata, tenant, tags, version, seq)
                SELECT label, chunk_id, document_id, text, source, metadata, {values} FROM chunks_old"""
        )
        self._db.execute("INSERT INTO vectors (label, vector) SELECT label, vector FROM chunks_old")
        # Labels are never reused, so the AUTOINCREMENT counter carries over.
        self._db.execute(
            """UPDATE sqlite_sequence SET seq = MAX(seq, (SELECT seq FROM sqlite_sequence WHERE name = 'chunks_old'))
               WHERE name = 'chunks'"""
        )
        self._db.execute("DELETE FROM sqlite_sequence WHERE name = 'chunks_old'")
        self._db.execute("DROP TABLE chunks_old")
        return True

    def _load_meta(self) -> None:
        defaults = {"dimension": self.dimension, "sequence": 0, "max_version": _FIRST_VERSION,
                    "store_id": secrets.randbits(63) or 1}
        self._db.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", defaults.items())
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        if meta["dimension"] != self.dimension:
            raise FailedPrecondition(
                f"shard at {self.data_dir} holds vectors of dimension {meta['dimension']}, not {self.dimension}"
            )
        self.sequence: int = meta["sequence"]
        self.max_version: int = meta["max_version"]
        #: Tells this store from any other, including one recreated in the same folder.
        self.store_id: int = meta["store_id"]

    def _open_index(self) -> tuple[VectorIndex, Manifest | None]:
        """The newest snapshot that verifies plus a replay of what came after it; else a full rebuild."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()
        for manifest in self._snapshots.manifests():
            problem = self._unusable(manifest)
            if problem is None:
                started = time.perf_counter()
                try:
                    index = VectorIndex.load(self._snapshots.index_path(manifest), self.dimension, manifest.live)
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
        index = self._build_index()
        if count:
            log.info("rebuilt the index of %d chunks from SQLite in %.2fs", count, time.perf_counter() - started)
        return index, None

    def _unusable(self, manifest: Manifest) -> str | None:
        if manifest.store_id != self.store_id:
            return "taken from another store"
        if manifest.dimension != self.dimension:
            return f"dimension {manifest.dimension}"
        if manifest.sequence > self.sequence:
            return f"newer than the database (sequence {self.sequence})"
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
        while rows := cursor.fetchmany(_READ_BATCH):
            labels = np.fromiter((label for label, _ in rows), dtype=np.uint64, count=len(rows))
            vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), -1)
            old = np.fromiter((int(label) in held for label in labels), dtype=bool, count=len(rows))
            index.update(labels[old], vectors[old])
            index.add(labels[~old], vectors[~old])
            changed += len(rows)
        return len(removed) + changed

    def _build_index(self) -> VectorIndex:
        """A fresh index over every chunk in SQLite."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()
        index = VectorIndex.empty(
            self.dimension, doubled(self._initial_capacity, count), self._m, self._ef_construction
        )
        cursor = self._db.execute("SELECT label, vector FROM vectors ORDER BY label")
        while rows := cursor.fetchmany(_READ_BATCH):
            labels = np.fromiter((label for label, _ in rows), dtype=np.uint64, count=len(rows))
            vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), -1)
            index.add(labels, vectors)
        return index

    def _load_filters(self) -> LabelFilters:
        filters = LabelFilters()
        for label, tenant, source, tags in self._db.execute("SELECT label, tenant, source, tags FROM chunks"):
            filters.add(label, tenant, source, _json(tags))
        return filters

    # ----------------------------------------------------------------- common

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _select(self, sql: str, keys: Sequence, *leading, db: sqlite3.Connection | None = None) -> Iterator[tuple]:
        """Runs `sql` with `leading` parameters, then its `IN ({})` bound to `keys`, a batch at a time."""
        db = db or self._db
        for start in range(0, len(keys), _SQL_BATCH):
            batch = keys[start : start + _SQL_BATCH]
            yield from db.execute(sql.format(",".join("?" * len(batch))), (*leading, *batch)).fetchall()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (WAL lets readers run beside the writer)."""
        reader = getattr(self._readers, "connection", None)
        if reader is None:
            # check_same_thread off only so that `close` can close it; it is used by its own thread alone.
            reader = sqlite3.connect(f"file:{self.data_dir / DB_FILE}?mode=ro", uri=True, check_same_thread=False)
            reader.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
            self._readers.connection = reader
            with self._readers_lock:
                self._reader_connections.append(reader)
        return reader

    def _validate(self, chunks: Sequence[ChunkRecord], one_tenant: bool) -> np.ndarray:
        """The chunks' vectors as one float32 matrix; raises InvalidArgument naming the first bad field."""
        seen: set[tuple[str, str]] = set()
        vectors = np.empty((len(chunks), self.dimension), dtype=np.float32)
        for i, chunk in enumerate(chunks):
            if not chunk.chunk_id:
                raise InvalidArgument(f"chunks[{i}].chunk_id", "must not be empty")
            if (chunk.tenant, chunk.chunk_id) in seen:
                raise InvalidArgument(f"chunks[{i}].chunk_id", f"{chunk.chunk_id!r} appears twice in the request")
            seen.add((chunk.tenant, chunk.chunk_id))
            if not chunk.document_id:
                raise InvalidArgument(f"chunks[{i}].document_id", "must not be empty")
            _check_name(f"chunks[{i}].tenant", chunk.tenant)
            if one_tenant and chunk.tenant != chunks[0].tenant:
                raise InvalidArgument(f"chunks[{i}].tenant", "every chunk of one request must have the same tenant")
            if len(chunk.tags) > _MAX_TAGS:
                raise InvalidArgument(f"chunks[{i}].tags", f"at most {_MAX_TAGS} tags, got {len(chunk.tags)}")
            for j, tag in enumerate(chunk.tags):
                if not tag:
                    raise InvalidArgument(f"chunks[{i}].tags[{j}]", "must not be empty")
                _check_name(f"chunks[{i}].tags[{j}]", tag)
            vector = np.asarray(chunk.vector, dtype=np.float32)
            if vector.shape != (self.dimension,):
                raise InvalidArgument(f"chunks[{i}].vector", f"expected {self.dimension} values, got {vector.size}")
            if not np.isfinite(vector).all():
                raise InvalidArgument(f"chunks[{i}].vector", "values must be finite")
            if not vector.any():
                raise InvalidArgument(f"chunks[{i}].vector", "must not be all zeros (cosine is undefined)")
            vectors[i] = vector
        return vectors


def _json(text: str):
    """json.loads with the common empty cases short-cut (a search decodes two per hit)."""
    if text == "{}":
        return {}
    if text == "[]":
        return []
    return json.loads(text)


def _check_name(field: str, value: str) -> None:
    if len(value) > _MAX_NAME:
        raise InvalidArgument(field, f"at most {_MAX_NAME} characters, got {len(value)}")


def _rss_bytes() -> int:
    """Resident memory of this process (Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
