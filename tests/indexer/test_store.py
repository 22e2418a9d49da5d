"""ShardStore without gRPC."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from indexer.store import DB_FILE, ChunkRecord, ShardStore, WriteResult
from fabric.errors import FailedPrecondition, InvalidArgument

DIM = 16


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def chunks_for(document_id: str, vectors: np.ndarray, prefix: str | None = None) -> list[ChunkRecord]:
    prefix = prefix or document_id
    return [
        ChunkRecord(
            chunk_id=f"{prefix}-{i}",
            document_id=document_id,
            vector=vector,
            text=f"text of {prefix}-{i}",
            source=f"file://{document_id}",
            metadata={"n": str(i)},
        )
        for i, vector in enumerate(vectors)
    ]


def counts(result: WriteResult) -> tuple[int, int, int]:
    return result.written, result.removed, result.sequence


@pytest.fixture
def store(tmp_path):
    store = ShardStore(tmp_path, DIM, initial_capacity=8)
    yield store
    store.close()


def test_search_finds_the_chunk_with_its_payload(store):
    vectors = unit_vectors(20)
    assert counts(store.upsert(chunks_for("doc", vectors))) == (20, 0, 1)

    [hits] = store.search(vectors[7:8], k=3)

    assert len(hits) == 3
    top = hits[0]
    assert (top.chunk_id, top.document_id, top.text, top.source, top.metadata) == (
        "doc-7", "doc", "text of doc-7", "file://doc", {"n": "7"},
    )
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_batch_search_answers_in_query_order(store):
    vectors = unit_vectors(30)
    store.upsert(chunks_for("doc", vectors))

    results = store.search(vectors[[4, 9, 2]], k=1)

    assert [hits[0].chunk_id for hits in results] == ["doc-4", "doc-9", "doc-2"]


def test_upsert_same_chunk_id_replaces_vector_and_keeps_one_copy(store):
    old, new = unit_vectors(2, seed=1)
    store.upsert(chunks_for("doc", old[None]))
    store.upsert([ChunkRecord("doc-0", "doc", new, text="rewritten")])

    [hits] = store.search(new[None], k=5)

    assert [(h.chunk_id, h.text) for h in hits] == [("doc-0", "rewritten")]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert store.stats().live_chunks == 1


def test_replace_documents_removes_chunks_not_rewritten(store):
    vectors = unit_vectors(8)
    store.upsert(chunks_for("a", vectors[:5]))
    store.upsert(chunks_for("b", vectors[5:]))

    result = store.upsert(chunks_for("a", vectors[:2]), replace_documents=True)

    assert (result.written, result.removed) == (2, 3)
    found = {h.chunk_id for h in store.search(vectors, k=10)[0]}
    assert found == {"a-0", "a-1", "b-0", "b-1", "b-2"}
    assert store.stats().live_chunks == 5


def test_delete_removes_every_chunk_of_the_documents(store):
    vectors = unit_vectors(9)
    store.upsert(chunks_for("a", vectors[:3]))
    store.upsert(chunks_for("b", vectors[3:6]))
    store.upsert(chunks_for("c", vectors[6:]))

    result = store.delete(["a", "c", "missing"])

    assert (result.removed, result.sequence) == (6, 4)
    assert {h.document_id for h in store.search(vectors, k=9)[0]} == {"b"}
    stats = store.stats()
    assert (stats.live_chunks, stats.documents, stats.sequence) == (3, 1, 4)


def test_k_larger_than_the_shard_returns_what_there_is(store):
    vectors = unit_vectors(3)
    store.upsert(chunks_for("doc", vectors))
    store.delete(["nothing"])

    assert [len(hits) for hits in store.search(vectors[:2], k=50)] == [3, 3]


def test_empty_shard_returns_no_hits(store):
    assert store.search(unit_vectors(2), k=5) == [[], []]
    store.upsert(chunks_for("doc", unit_vectors(2)))
    store.delete(["doc"])
    assert store.search(unit_vectors(2), k=5) == [[], []]


def test_reopen_finds_everything_beyond_the_initial_capacity(tmp_path):
    vectors = unit_vectors(100)
    store = ShardStore(tmp_path, DIM, initial_capacity=8)
    for start in range(0, 100, 10):
        store.upsert(chunks_for(f"doc{start}", vectors[start : start + 10]))
    store.delete(["doc0"])
    assert store.stats().capacity == 128
    store.close()

    reopened = ShardStore(tmp_path, DIM, initial_capacity=8)
    try:
        stats = reopened.stats()
        assert (stats.live_chunks, stats.documents, stats.sequence) == (90, 9, 11)
        results = reopened.search(vectors[10:], k=1)
        assert [hits[0].chunk_id for hits in results] == [f"doc{i // 10 * 10}-{i % 10}" for i in range(10, 100)]
        assert reopened.search(vectors[:1], k=1)[0][0].document_id != "doc0"
    finally:
        reopened.close()


def test_storage_is_wal_with_float32_vectors(store, tmp_path):
    vector = unit_vectors(1)[0]
    store.upsert(chunks_for("doc", vector[None]))

    with sqlite3.connect(tmp_path / DB_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        (blob,) = db.execute("SELECT vector FROM vectors").fetchone()
    np.testing.assert_array_equal(np.frombuffer(blob, dtype=np.float32), vector)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: COMMIT fsyncs the log


def test_deleted_slots_are_reused_under_churn(store):
    for round_ in range(20):
        vectors = unit_vectors(6, seed=round_)
        store.upsert(chunks_for("doc", vectors, prefix=f"r{round_}"), replace_documents=True)

    assert store.stats().capacity == 8
    assert store.stats().live_chunks == 6
    [hits] = store.search(vectors[:1], k=10)
    assert {h.chunk_id for h in hits} == {f"r19-{i}" for i in range(6)}
    assert hits[0].chunk_id == "r19-0"


@pytest.mark.parametrize(
    ("chunk", "field"),
    [
        (ChunkRecord("", "doc", np.ones(DIM)), "chunks[1].chunk_id"),
        (ChunkRecord("x", "", np.ones(DIM)), "chunks[1].document_id"),
        (ChunkRecord("x", "doc", np.ones(DIM + 1)), "chunks[1].vector"),
        (ChunkRecord("x", "doc", np.full(DIM, np.nan)), "chunks[1].vector"),
        (ChunkRecord("x", "doc", np.zeros(DIM)), "chunks[1].vector"),
        (ChunkRecord("ok", "doc", np.ones(DIM)), "chunks[1].chunk_id"),
    ],
)
def test_invalid_chunks_are_refused_and_nothing_is_written(store, chunk, field):
    with pytest.raises(InvalidArgument) as error:
        store.upsert([ChunkRecord("ok", "doc", np.ones(DIM)), chunk])

    assert error.value.field == field
    stats = store.stats()
    assert (stats.live_chunks, stats.sequence) == (0, 0)


def test_queries_of_the_wrong_dimension_are_refused(store):
    store.upsert(chunks_for("doc", unit_vectors(2)))

    with pytest.raises(InvalidArgument) as error:
        store.search(np.ones((1, DIM + 1), dtype=np.float32), k=1)

    assert error.value.field == "queries"


def test_reopening_with_another_dimension_is_refused(tmp_path):
    ShardStore(tmp_path, DIM).close()

    with pytest.raises(FailedPrecondition, match="dimension 16"):
        ShardStore(tmp_path, DIM * 2)


def test_search_falls_back_to_exact_when_hnswlib_cannot_fill_k(store, monkeypatch):
    vectors = unit_vectors(10)
    store.upsert(chunks_for("doc", vectors))
    index = store._index._index

    class ReachesOnlyThree:
        """hnswlib raises when a query reaches fewer than k live neighbours, as it can after deletions."""

        def __getattr__(self, name):
            return getattr(index, name)

        def knn_query(self, queries, k, **options):
            if k > 3:
                raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")
            return index.knn_query(queries, k=k, **options)

    monkeypatch.setattr(store._index, "_index", ReachesOnlyThree())

    results = store.search(vectors[:2], k=8)

    exact = np.argsort(-(vectors[:2] @ vectors.T), axis=1)[:, :8]
    assert [[h.chunk_id for h in hits] for hits in results] == [[f"doc-{i}" for i in row] for row in exact]


def test_hits_read_off_the_store_thread_leave_out_chunks_deleted_meanwhile(store):
    import threading

    from indexer.filters import SearchFilter

    vectors = unit_vectors(6)
    store.upsert(chunks_for("a", vectors[:3]))
    store.upsert(chunks_for("b", vectors[3:]))
    neighbours = store.nearest(vectors[:1], k=6, ef=16, where=SearchFilter())
    store.delete(["b"])

    results = []
    reader = threading.Thread(target=lambda: results.append(store.hits(neighbours, "")))
    reader.start()
    reader.join()

    [hits] = results[0]
    assert sorted(h.chunk_id for h in hits) == ["a-0", "a-1", "a-2"]
    assert store.hits(neighbours, "other tenant") == [[]]
