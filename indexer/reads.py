"""The read paths: the nearest chunks to query vectors (HNSW, or exact by brute force where a
filter allows few chunks or hnswlib cannot fill k), BM25 lexical search, and the payloads of
the chunks found.

`nearest`, `lexical_hits` and the counts read through the store's own connection, on its thread;
payloads (`hits`) through a connection of the calling thread's own, so they may be read on
any thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence, Set

import numpy as np

from fabric.errors import InvalidArgument
from indexer import lexical
from indexer.payloads import PayloadCache
from indexer.records import HitRecord, Payload, decode_json
from indexer.sql import READ_BATCH, Readers, select
from indexer.vectors import Neighbours, VectorIndex


def check_queries(queries: np.ndarray, k: int, dimension: int) -> np.ndarray:
    """`queries` as a float32 matrix; raises InvalidArgument for bad queries or a bad `k`."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dimension:
        raise InvalidArgument("queries", f"expected vectors of dimension {dimension}, got shape {queries.shape}")
    if not np.isfinite(queries).all():
        raise InvalidArgument("queries", "values must be finite")
    if k <= 0:
        raise InvalidArgument("k", "must be positive")
    return queries


def nearest(
    db: sqlite3.Connection,
    index: VectorIndex,
    allowed: Set[int],
    queries: np.ndarray,
    k: int,
    ef: int,
    exact_search_max: int,
) -> list[Neighbours]:
    """The labels of the `k` nearest of `allowed` for each (checked) query, nearest first."""
    if len(allowed) != index.live and len(allowed) <= exact_search_max and min(k, len(allowed), len(queries)):
        return exact(db, queries, min(k, len(allowed)), allowed)
    neighbours = indexed(index, allowed, queries, k, ef)
    short = [i for i, found in enumerate(neighbours) if found is None]
    if short:
        for i, found in zip(short, exact(db, queries[short], min(k, len(allowed)), allowed)):
            neighbours[i] = found
    return neighbours


def indexed(index: VectorIndex, allowed: Set[int], queries: np.ndarray, k: int, ef: int) -> list[Neighbours]:
    """`nearest` by hnswlib alone: None for a query it could not fill (`exact` answers those)."""
    k = min(k, len(allowed))
    if k == 0 or len(queries) == 0:
        nothing = (np.empty(0, np.uint64), np.empty(0, np.float32))
        return [nothing for _ in range(len(queries))]
    everything = len(allowed) == index.live
    return index.knn(queries, k, ef, None if everything else allowed.__contains__)


def exact(db: sqlite3.Connection, queries: np.ndarray, k: int, labels: Set[int]) -> list[Neighbours]:
    """The k nearest of `labels` for each query by brute force, from the vectors in SQLite."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best_labels = np.empty((len(queries), 0), dtype=np.uint64)
    ordered = sorted(labels)
    for start in range(0, len(ordered), READ_BATCH):
        batch = ordered[start : start + READ_BATCH]
        rows = list(select(db, "SELECT label, vector FROM vectors WHERE label IN ({})", batch))
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


def lexical_hits(
    db: sqlite3.Connection, readers: Readers, allowed: Set[int], queries: Sequence[str], k: int, tenant: str,
    cache: PayloadCache | None = None,
) -> list[list[HitRecord]]:
    """The `k` chunks of `allowed` that best match each query's words (BM25), best first."""
    ranked = [lexical.top(db, query, k, allowed) for query in queries]
    by_label = payloads(readers, tenant, {label for found in ranked for label, _ in found}, cache)
    return [[HitRecord(by_label[label], score) for label, score in found if label in by_label] for found in ranked]


def hits(
    readers: Readers, neighbours: list[Neighbours], tenant: str, cache: PayloadCache | None = None
) -> list[list[HitRecord]]:
    """The chunks behind the labels `nearest` found in `tenant`; a chunk deleted since is left out."""
    found = [(labels.tolist(), (1.0 - distances).tolist()) for labels, distances in neighbours]
    by_label = payloads(readers, tenant, {label for labels, _ in found for label in labels}, cache)
    get = by_label.get
    return [
        [HitRecord(payload, score) for payload, score in zip(map(get, labels), scores) if payload is not None]
        for labels, scores in found
    ]


def payloads(readers: Readers, tenant: str, labels: set[int], cache: PayloadCache | None = None) -> dict[int, Payload]:
    """The payloads by label of those of `labels` in `tenant`: from `cache` where it holds them, the
    rest through this thread's reader."""
    if cache is not None:
        by_label, missing, generation = cache.lookup(labels)
    else:
        by_label, missing, generation = {}, list(labels), 0
    if missing:
        read = {
            label: Payload(row_tenant, chunk_id, document_id, text, source, decode_json(metadata),
                           tuple(decode_json(tags)))
            for label, row_tenant, chunk_id, document_id, text, source, metadata, tags in select(
                readers.connection(),
                "SELECT label, tenant, chunk_id, document_id, text, source, metadata, tags FROM chunks "
                "WHERE label IN ({})",
                missing,
            )
        }
        if cache is not None:
            cache.store(read, generation)
        by_label.update(read)
    # The tenant check repeats the filter that chose the labels: isolation twice over. (In SQL it
    # would lead SQLite to scan the tenant's index instead of looking labels up by key.)
    return {label: payload for label, payload in by_label.items() if payload.tenant == tenant}


def chunk_counts(db: sqlite3.Connection, document_ids: Sequence[str], tenant: str) -> dict[str, int]:
    """Chunks held for each of `document_ids` in `tenant` (0 for documents not here)."""
    counts = dict.fromkeys(document_ids, 0)
    counts.update(
        select(
            db,
            "SELECT document_id, COUNT(*) FROM chunks WHERE tenant = ? AND document_id IN ({}) GROUP BY document_id",
            list(counts),
            tenant,
        )
    )
    return counts


def stored_counts(db: sqlite3.Connection) -> tuple[int, int]:
    """(documents, tombstones) held in SQLite, for the shard's stats."""
    (documents,) = db.execute("SELECT COUNT(*) FROM (SELECT DISTINCT tenant, document_id FROM chunks)").fetchone()
    (tombstones,) = db.execute("SELECT COUNT(*) FROM tombstones").fetchone()
    return documents, tombstones
