"""One shard: SQLite holds the chunks durably, an in-memory hnswlib index is derived from it.

Every write commits to SQLite first and only then touches the index, so a write is
acknowledged once durable and a crash can lose nothing the index would need: the
index is rebuilt from SQLite whenever the store opens.

Not thread-safe: hnswlib must not add while it searches and the SQLite connection
belongs to the thread that opened it, so every call must come from one thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hnswlib
import numpy as np

from mesh.errors import FailedPrecondition, InvalidArgument

DB_FILE = "chunks.sqlite3"

# Keeps every `IN (...)` list well under SQLite's bound-parameter limit.
_SQL_BATCH = 500
# Rows read per `add_items` call while rebuilding the index.
_REBUILD_BATCH = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- AUTOINCREMENT: a label is never reused, since hnswlib may still hold a deleted one.
CREATE TABLE IF NOT EXISTS chunks (
    label       INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk_id    TEXT NOT NULL UNIQUE,
    document_id TEXT NOT NULL,
    text        TEXT NOT NULL,
    source      TEXT NOT NULL,
    metadata    TEXT NOT NULL,
    vector      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (document_id);
"""


@dataclass
class ChunkRecord:
    """A chunk to write; `vector` must have the shard's dimension."""

    chunk_id: str
    document_id: str
    vector: np.ndarray | Sequence[float]
    text: str = ""
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class HitRecord:
    """A chunk found by a search; `score` is the cosine similarity to the query."""

    chunk_id: str
    document_id: str
    score: float
    text: str
    source: str
    metadata: dict[str, str]


@dataclass
class ShardStats:
    live_chunks: int
    documents: int
    dimension: int
    sequence: int
    #: Slots the HNSW index holds before it must grow.
    capacity: int


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
    ):
        if dimension <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        self.data_dir = Path(data_dir)
        self.dimension = dimension
        self._m = m
        self._ef_construction = ef_construction
        self._initial_capacity = max(1, initial_capacity)

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are begun and committed explicitly in `_transaction`.
        self._db = sqlite3.connect(self.data_dir / DB_FILE, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            with self._transaction():
                self.sequence = self._load_meta()
            self._index, self._live = self._build_index()
        except BaseException:
            self._db.close()
            raise

    # ----------------------------------------------------------------- writes

    def upsert(self, chunks: Sequence[ChunkRecord], replace_documents: bool = False) -> tuple[int, int, int]:
        """Writes `chunks`, replacing any with the same chunk_id (which keeps its label).

        With `replace_documents`, the earlier chunks of every document named in `chunks`
        that this call does not rewrite are removed in the same transaction.
        Returns (upserted, removed, sequence).
        """
        vectors = self._validate(chunks)
        chunk_ids = [c.chunk_id for c in chunks]
        rows = [
            (c.chunk_id, c.document_id, c.text, c.source, json.dumps(c.metadata), vectors[i].tobytes())
            for i, c in enumerate(chunks)
        ]
        with self._transaction():
            existing = dict(self._select("SELECT chunk_id, label FROM chunks WHERE chunk_id IN ({})", chunk_ids))
            removed: list[int] = []
            if replace_documents:
                wanted = set(chunk_ids)
                document_ids = list(dict.fromkeys(c.document_id for c in chunks))
                removed = [
                    label
                    for label, chunk_id in self._select(
                        "SELECT label, chunk_id FROM chunks WHERE document_id IN ({})", document_ids
                    )
                    if chunk_id not in wanted
                ]
                self._db.executemany("DELETE FROM chunks WHERE label = ?", ((label,) for label in removed))
            self._db.executemany(
                """INSERT INTO chunks (chunk_id, document_id, text, source, metadata, vector)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (chunk_id) DO UPDATE SET
                       document_id = excluded.document_id, text = excluded.text, source = excluded.source,
                       metadata = excluded.metadata, vector = excluded.vector""",
                rows,
            )
            labels = dict(self._select("SELECT chunk_id, label FROM chunks WHERE chunk_id IN ({})", chunk_ids))
            sequence = self._bump_sequence()

        is_new = np.array([chunk_id not in existing for chunk_id in chunk_ids], dtype=bool)
        ordered = np.array([labels[chunk_id] for chunk_id in chunk_ids], dtype=np.uint64)
        self._apply(
            removed=removed,
            updated=(vectors[~is_new], ordered[~is_new]),
            added=(vectors[is_new], ordered[is_new]),
        )
        return len(chunks), len(removed), sequence

    def delete(self, document_ids: Sequence[str]) -> tuple[int, int]:
        """Removes every chunk of `document_ids`. Returns (removed, sequence)."""
        for i, document_id in enumerate(document_ids):
            if not document_id:
                raise InvalidArgument(f"document_ids[{i}]", "must not be empty")
        with self._transaction():
            removed = [
                label
                for (label,) in self._select(
                    "SELECT label FROM chunks WHERE document_id IN ({})", list(dict.fromkeys(document_ids))
                )
            ]
            self._db.executemany("DELETE FROM chunks WHERE label = ?", ((label,) for label in removed))
            sequence = self._bump_sequence()
        self._apply(removed=removed)
        return len(removed), sequence

    # ------------------------------------------------------------------ reads

    def search(self, queries: np.ndarray, k: int, ef: int = 64) -> list[list[HitRecord]]:
        """The `k` nearest live chunks of each query row, best first.

        Fewer than `k` hits come back when the shard holds fewer live chunks.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise InvalidArgument("queries", f"expected vectors of dimension {self.dimension}, got shape {queries.shape}")
        if not np.isfinite(queries).all():
            raise InvalidArgument("queries", "values must be finite")
        if k <= 0:
            raise InvalidArgument("k", "must be positive")
        k = min(k, self._live)
        if k == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]

        neighbours = self._knn(queries, k, max(ef, k))
        payloads = self._payloads({int(label) for labels, _ in neighbours for label in labels})
        results = []
        for labels, distances in neighbours:
            hits = []
            for label, distance in zip(labels, distances):
                row = payloads.get(int(label))
                if row is not None:
                    chunk_id, document_id, text, source, metadata = row
                    hits.append(HitRecord(chunk_id, document_id, 1.0 - float(distance), text, source, metadata))
            results.append(hits)
        return results

    def chunk_counts(self, document_ids: Sequence[str]) -> dict[str, int]:
        """Chunks held for each of `document_ids` (0 for documents not here)."""
        counts = dict.fromkeys(document_ids, 0)
        keys = list(counts)
        counts.update(self._select("SELECT document_id, COUNT(*) FROM chunks WHERE document_id IN ({}) GROUP BY document_id", keys))
        return counts

    def stats(self) -> ShardStats:
        live, documents = self._db.execute("SELECT COUNT(*), COUNT(DISTINCT document_id) FROM chunks").fetchone()
        return ShardStats(
            live_chunks=live,
            documents=documents,
            dimension=self.dimension,
            sequence=self.sequence,
            capacity=self._index.get_max_elements(),
        )

    def close(self) -> None:
        self._db.close()

    # --------------------------------------------------------------- internal

    def _load_meta(self) -> int:
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('dimension', ?)", (self.dimension,))
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('sequence', 0)")
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        if meta["dimension"] != self.dimension:
            raise FailedPrecondition(
                f"shard at {self.data_dir} holds vectors of dimension {meta['dimension']}, not {self.dimension}"
            )
        return meta["sequence"]

    def _bump_sequence(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'sequence'")
        self.sequence += 1
        return self.sequence

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _select(self, sql: str, keys: Sequence) -> Iterator[tuple]:
        """Runs `sql` with its `IN ({})` bound to `keys`, a batch at a time."""
        for start in range(0, len(keys), _SQL_BATCH):
            batch = keys[start : start + _SQL_BATCH]
            yield from self._db.execute(sql.format(",".join("?" * len(batch))), batch)

    def _validate(self, chunks: Sequence[ChunkRecord]) -> np.ndarray:
        """The chunks' vectors as one float32 matrix; raises InvalidArgument naming the first bad field."""
        seen: set[str] = set()
        vectors = np.empty((len(chunks), self.dimension), dtype=np.float32)
        for i, chunk in enumerate(chunks):
            if not chunk.chunk_id:
                raise InvalidArgument(f"chunks[{i}].chunk_id", "must not be empty")
            if chunk.chunk_id in seen:
                raise InvalidArgument(f"chunks[{i}].chunk_id", f"{chunk.chunk_id!r} appears twice in the request")
            seen.add(chunk.chunk_id)
            if not chunk.document_id:
                raise InvalidArgument(f"chunks[{i}].document_id", "must not be empty")
            vector = np.asarray(chunk.vector, dtype=np.float32)
            if vector.shape != (self.dimension,):
                raise InvalidArgument(
                    f"chunks[{i}].vector", f"expected {self.dimension} values, got {vector.size}"
                )
            if not np.isfinite(vector).all():
                raise InvalidArgument(f"chunks[{i}].vector", "values must be finite")
            if not vector.any():
                raise InvalidArgument(f"chunks[{i}].vector", "must not be all zeros (cosine is undefined)")
            vectors[i] = vector
        return vectors

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="cosine", dim=self.dimension)
        index.init_index(
            max_elements=capacity, ef_construction=self._ef_construction, M=self._m, allow_replace_deleted=True
        )
        return index

    def _build_index(self) -> tuple[hnswlib.Index, int]:
        """A fresh index over every chunk in SQLite."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()
        index = self._new_index(_doubled(self._initial_capacity, count))
        cursor = self._db.execute("SELECT label, vector FROM chunks ORDER BY label")
        while rows := cursor.fetchmany(_REBUILD_BATCH):
            labels = np.fromiter((label for label, _ in rows), dtype=np.uint64, count=len(rows))
            vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), -1)
            index.add_items(vectors, labels)
        return index, count

    def _apply(
        self,
        removed: Iterable[int] = (),
        updated: tuple[np.ndarray, np.ndarray] | None = None,
        added: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Mirrors a committed write into the index; rebuilds it from SQLite should that fail."""
        try:
            for label in removed:
                self._index.mark_deleted(label)
                self._live -= 1
            if updated is not None and len(updated[1]):
                # An existing label re-added in place takes the new vector. replace_deleted must
                # stay off here: it would move the label to a vacant slot and orphan the old one.
                self._index.add_items(*updated)
            if added is not None and len(added[1]):
                vectors, labels = added
                needed = max(self._index.get_current_count(), self._live + len(labels))
                if needed > self._index.get_max_elements():
                    self._index.resize_index(_doubled(self._index.get_max_elements(), needed))
                self._index.add_items(vectors, labels, replace_deleted=True)
                self._live += len(labels)
        except Exception:
            self._index, self._live = self._build_index()
            raise

    def _knn(self, queries: np.ndarray, k: int, ef: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(labels, distances) per query row."""
        self._index.set_ef(ef)
        try:
            return list(zip(*self._index.knn_query(queries, k=k)))
        except RuntimeError:
            pass
        # hnswlib refuses a batch when any query reaches fewer than k live neighbours, which
        # deletions can cause. Search the rows alone over the whole index, settling for fewer.
        self._index.set_ef(max(ef, self._index.get_current_count()))
        results = []
        for query in queries:
            want = k
            while True:
                try:
                    labels, distances = self._index.knn_query(query, k=want)
                    results.append((labels[0], distances[0]))
                    break
                except RuntimeError:
                    if want == 1:
                        results.append((np.empty(0, np.uint64), np.empty(0, np.float32)))
                        break
                    want //= 2
        return results

    def _payloads(self, labels: set[int]) -> dict[int, tuple[str, str, str, str, dict[str, str]]]:
        rows = self._select(
            "SELECT label, chunk_id, document_id, text, source, metadata FROM chunks WHERE label IN ({})",
            list(labels),
        )
        return {
            label: (chunk_id, document_id, text, source, json.loads(metadata))
            for label, chunk_id, document_id, text, source, metadata in rows
        }


def _doubled(capacity: int, needed: int) -> int:
    """`capacity` doubled until it holds `needed`."""
    while capacity < needed:
        capacity *= 2
    return capacity
