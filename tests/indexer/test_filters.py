"""Tenants, tags and sources: filters applied inside the search, and tenants that never mix."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.filters import SearchFilter
from indexer.store import ChunkRecord, ShardStore

DIM = 16


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def chunk(i: int, vector, tenant: str = "", document_id: str | None = None, tags=(), source: str = "") -> ChunkRecord:
    return ChunkRecord(
        chunk_id=f"c{i}", document_id=document_id or f"d{i}", vector=vector, text=f"{tenant}:{i}",
        source=source or f"file:///docs/{i % 10}.txt", tenant=tenant, tags=tags,
    )


@pytest.fixture(params=[0, 10_000], ids=["hnsw-filter", "exact"])
def store(tmp_path, request):
    """Filtered searches through hnswlib's filter, and through brute force over the allowed set."""
    store = ShardStore(tmp_path, DIM, initial_capacity=64, exact_search_max=request.param)
    yield store
    store.close()


def brute_force(vectors: np.ndarray, allowed: list[int], query: np.ndarray, k: int) -> list[int]:
    scores = vectors[allowed] @ query
    return [allowed[i] for i in np.argsort(-scores)[:k]]


def test_selective_tag_filter_returns_k_hits_when_k_chunks_match(store):
    vectors = unit_vectors(2000)
    tagged = set(range(0, 2000, 97))  # 21 chunks, about 1% of the shard
    store.upsert([chunk(i, v, tags=["rare"] if i in tagged else ["common"]) for i, v in enumerate(vectors)])

    results = store.search(unit_vectors(5, seed=1), k=10, where=SearchFilter(tags=frozenset({"rare"})))

    for query, hits in zip(unit_vectors(5, seed=1), results):
        assert len(hits) == 10
        assert {h.chunk_id for h in hits} <= {f"c{i}" for i in tagged}
        assert [h.chunk_id for h in hits] == [f"c{i}" for i in brute_force(vectors, sorted(tagged), query, 10)]


def test_filter_matching_fewer_than_k_returns_all_of_them(store):
    vectors = unit_vectors(300)
    store.upsert([chunk(i, v, tags=["x"] if i < 3 else []) for i, v in enumerate(vectors)])

    [hits] = store.search(vectors[:1], k=10, where=SearchFilter(tags=frozenset({"x"})))

    assert sorted(h.chunk_id for h in hits) == ["c0", "c1", "c2"]


def test_any_of_the_tags_matches_and_tags_come_back(store):
    vectors = unit_vectors(60)
    tags = [["red"], ["blue"], ["red", "green"], []]
    store.upsert([chunk(i, v, tags=tags[i % 4]) for i, v in enumerate(vectors)])

    [hits] = store.search(vectors[:1], k=60, where=SearchFilter(tags=frozenset({"blue", "green"})))

    assert len(hits) == 30
    assert all({"blue", "green"} & set(h.tags) for h in hits)


def test_source_exact_and_prefix(store):
    vectors = unit_vectors(100)
    sources = ["file:///docs/a.txt", "file:///docs/b.txt", "https://example.org/a", "file:///docs/archive/c.txt"]
    store.upsert([chunk(i, v, source=sources[i % 4]) for i, v in enumerate(vectors)])

    [exact] = store.search(vectors[:1], k=100, where=SearchFilter(source="file:///docs/a.txt"))
    [prefix] = store.search(vectors[:1], k=100, where=SearchFilter(source_prefix="file:///docs/"))
    [both] = store.search(vectors[:1], k=100, where=SearchFilter(source_prefix="file:///docs/", tags=frozenset({"x"})))

    assert len(exact) == 25 and {h.source for h in exact} == {sources[0]}
    assert len(prefix) == 75 and all(h.source.startswith("file:///docs/") for h in prefix)
    assert both == []


def test_a_tenant_never_sees_another_tenants_chunks(store):
    vectors = unit_vectors(400)
    # Tenant B holds the exact query vectors with the same tags and sources: the best matches by far.
    store.upsert([chunk(i, v, tenant="A", tags=["t"]) for i, v in enumerate(vectors[:200])])
    store.upsert([chunk(i, v, tenant="B", tags=["t"]) for i, v in enumerate(vectors[200:])])
    store.upsert([chunk(i, v, tags=["t"]) for i, v in enumerate(vectors[:5])])  # the default tenant ""

    filters = [
        SearchFilter(tenant="A"),
        SearchFilter(tenant="A", tags=frozenset({"t"})),
        SearchFilter(tenant="A", source_prefix="file://"),
        SearchFilter(tenant="A", source="file:///docs/1.txt", tags=frozenset({"t"})),
    ]
    for where in filters:
        for hits in store.search(vectors[200:220], k=50, where=where):
            assert hits and {h.tenant for h in hits} == {"A"}, where
            assert all(h.text.startswith("A:") for h in hits)
    [default] = store.search(vectors[200:201], k=50)
    assert {h.tenant for h in default} == {""} and len(default) == 5
    assert store.search(vectors[:1], k=5, where=SearchFilter(tenant="nobody")) == [[]]


def test_ids_are_scoped_by_tenant_and_deletes_stay_inside_theirs(store):
    vectors = unit_vectors(4)
    store.upsert([chunk(0, vectors[0], tenant="A", document_id="doc")])
    store.upsert([chunk(0, vectors[1], tenant="B", document_id="doc")])  # same chunk and document id

    assert store.stats().live_chunks == 2
    assert store.chunk_counts(["doc"], tenant="A") == {"doc": 1}

    result = store.delete(["doc"], tenant="A")

    assert result.removed == 1
    assert store.search(vectors[:1], k=5, where=SearchFilter(tenant="A")) == [[]]
    [hits] = store.search(vectors[1:2], k=5, where=SearchFilter(tenant="B"))
    assert [(h.tenant, h.chunk_id, h.document_id) for h in hits] == [("B", "c0", "doc")]
    assert store.delete(["doc"]).removed == 0  # the default tenant has no "doc"


def test_replace_documents_stays_inside_the_tenant(store):
    vectors = unit_vectors(6)
    store.upsert([chunk(i, vectors[i], tenant="A", document_id="doc") for i in range(3)])
    store.upsert([chunk(i, vectors[3 + i], tenant="B", document_id="doc") for i in range(3)])

    result = store.upsert([chunk(0, vectors[0], tenant="A", document_id="doc")], replace_documents=True)

    assert (result.written, result.removed) == (1, 2)
    assert store.chunk_counts(["doc"], tenant="B") == {"doc": 3}


def test_one_request_holds_one_tenant(store):
    from fabric.errors import InvalidArgument

    vectors = unit_vectors(2)
    with pytest.raises(InvalidArgument) as error:
        store.upsert([chunk(0, vectors[0], tenant="A"), chunk(1, vectors[1], tenant="B")])
    assert error.value.field == "chunks[1].tenant"


def test_filters_follow_updates_and_deletes(store):
    vectors = unit_vectors(3)
    store.upsert([chunk(0, vectors[0], tags=["old"], document_id="doc")])
    store.upsert([chunk(0, vectors[0], tags=["new"], document_id="doc")])

    assert store.search(vectors[:1], k=3, where=SearchFilter(tags=frozenset({"old"}))) == [[]]
    [hits] = store.search(vectors[:1], k=3, where=SearchFilter(tags=frozenset({"new"})))
    assert [h.tags for h in hits] == [["new"]]

    store.delete(["doc"])
    assert store.search(vectors[:1], k=3, where=SearchFilter(tags=frozenset({"new"}))) == [[]]
    assert store.stats().tenants == 0


def test_filtered_recall_through_hnsw_matches_brute_force(tmp_path):
    """A filter letting 20% through, answered inside hnswlib (exact search off): recall@10 stays high."""
    vectors = unit_vectors(3000, seed=7)
    store = ShardStore(tmp_path, DIM, exact_search_max=0)
    try:
        store.upsert([chunk(i, v, tags=["a"] if i % 5 == 0 else ["b"]) for i, v in enumerate(vectors)])
        queries = unit_vectors(50, seed=8)
        results = store.search(queries, k=10, ef=64, where=SearchFilter(tags=frozenset({"a"})))
    finally:
        store.close()
    allowed = list(range(0, 3000, 5))
    found = sum(
        len({h.chunk_id for h in hits} & {f"c{i}" for i in brute_force(vectors, allowed, q, 10)})
        for q, hits in zip(queries, results)
    )
    assert all(len(hits) == 10 for hits in results)
    assert found / (10 * len(queries)) >= 0.95
