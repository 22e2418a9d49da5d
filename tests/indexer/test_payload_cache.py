"""The payload cache in front of SQLite never serves a deleted or replaced chunk."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.filters import SearchFilter
from indexer.logapply import LogDelete, LogPut
from indexer.payloads import PayloadCache
from indexer.store import ChunkRecord, ShardStore
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from tests.indexer.test_server import chunk, running, settings_for, unit_vectors as unit_vectors_8

DIM = 16


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def chunks(document_id: str, vectors: np.ndarray, text: str, tenant: str = "", tags=()) -> list[ChunkRecord]:
    return [
        ChunkRecord(chunk_id=f"{document_id}-{i}", document_id=document_id, vector=v, text=f"{text} {i}",
                    source="s", metadata={"text": text}, tenant=tenant, tags=list(tags))
        for i, v in enumerate(vectors)
    ]


def texts(store: ShardStore, queries: np.ndarray, k: int = 3, **where) -> list[list[str]]:
    return [[h.text for h in hits] for hits in store.search(queries, k, 64, SearchFilter(**where))]


@pytest.fixture
def store(tmp_path):
    store = ShardStore(tmp_path, DIM, initial_capacity=8)
    yield store
    store.close()


def test_replaced_and_deleted_chunks_never_come_from_the_cache(store):
    vectors = unit_vectors(6)
    store.upsert(chunks("a", vectors[:3], "old"))
    store.upsert(chunks("b", vectors[3:], "other"))
    assert texts(store, vectors[:1], 1) == [["old 0"]]
    assert texts(store, vectors[:1], 1) == [["old 0"]]
    assert store.payloads.hits > 0  # the second search was answered from the cache

    store.upsert(chunks("a", vectors[:3], "new"))  # rewritten in place (same labels)
    assert texts(store, vectors[:1], 1) == [["new 0"]]
    hit = store.search(vectors[:1], 1)[0][0]
    assert hit.metadata == {"text": "new"}

    store.upsert(chunks("a", vectors[1:2], "only"), replace_documents=True)  # a-0 and a-2 removed
    found = set(texts(store, vectors[:1], 6)[0])
    assert found == {"only 0", "other 0", "other 1", "other 2"}

    store.delete(["a"])
    for query in vectors:
        assert all(not t.startswith(("old", "new", "only")) for t in texts(store, query[None], 6)[0])
    store.delete(["b"])
    assert texts(store, vectors, 3) == [[]] * 6


def test_a_hit_changed_by_its_caller_leaves_the_cache_alone(store):
    vectors = unit_vectors(1)
    store.upsert(chunks("a", vectors, "t", tags=["x"]))
    hit = store.search(vectors, 1)[0][0]
    hit.metadata["text"] = "changed"
    hit.tags.append("y")
    again = store.search(vectors, 1)[0][0]
    assert (again.metadata, again.tags) == ({"text": "t"}, ["x"])


def test_the_cache_keeps_tenants_apart(store):
    vectors = unit_vectors(2)
    store.upsert(chunks("a", vectors, "mine", tenant="t1"))
    assert texts(store, vectors, 1, tenant="t1") == [["mine 0"], ["mine 1"]]
    assert store.hits(store.nearest(vectors, 1, 64, SearchFilter("t1")), "t2") == [[], []]


def test_log_applies_invalidate_the_cache(store):
    vectors = unit_vectors(2)
    store.apply_log([LogPut(1, "", "a", "h1", chunks("a", vectors, "v1"), 0)], 1)
    assert texts(store, vectors, 1) == [["v1 0"], ["v1 1"]]
    store.apply_log([LogPut(2, "", "a", "h2", chunks("a", vectors, "v2"), 0)], 2)
    assert texts(store, vectors, 1) == [["v2 0"], ["v2 1"]]
    store.apply_log([LogDelete(3, "", "a")], 3)
    assert texts(store, vectors, 1) == [[], []]


def test_lexical_search_after_a_delete(store):
    vectors = unit_vectors(2)
    store.upsert(chunks("a", vectors, "walrus"))
    assert len(store.lexical_search(["walrus"], 5)[0]) == 2
    store.delete(["a"])
    assert store.lexical_search(["walrus"], 5) == [[]]


def test_a_read_racing_a_write_is_not_put_back():
    cache = PayloadCache(10)
    cache.store({1: ("", "c", "d", "old", "s", {}, ())}, cache.lookup([1])[2])
    found, missing, generation = cache.lookup([1, 2])
    assert list(found) == [1] and missing == [2]
    # A reader missed label 2 and read it; meanwhile a write replaced it and invalidated.
    cache.invalidate([2])
    cache.store({2: ("", "c2", "d", "stale", "s", {}, ())}, generation)
    assert cache.lookup([2])[1] == [2]
    cache.invalidate([1])
    assert cache.lookup([1])[1] == [1]


def test_the_cache_is_bounded():
    cache = PayloadCache(3)
    for label in range(5):
        cache.store({label: ("",)}, cache.lookup([])[2])
    assert len(cache) == 3 and cache.lookup([0, 1])[1] == [0, 1]
    disabled = PayloadCache(0)
    disabled.store({1: ("",)}, disabled.lookup([])[2])
    assert len(disabled) == 0


@pytest.mark.parametrize("one_hop_queries,inline_search", [(0, 0), (64, 0), (64, 256)])
async def test_through_grpc_replace_then_delete(tmp_path, one_hop_queries, inline_search):
    vectors = unit_vectors_8(3)
    settings = settings_for(tmp_path, one_hop_queries=one_hop_queries, inline_search=inline_search)
    async with running(settings) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)

        async def search() -> list[str]:
            request = indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=vectors[0].tolist())], k=3)
            return [h.text for h in (await stub.Search(request)).results[0].hits]

        await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(i, v) for i, v in enumerate(vectors)]))
        assert sorted(await search()) == ["chunk 0", "chunk 1", "chunk 2"]
        assert (await search())[0] == "chunk 0"
        replaced = chunk(0, vectors[0])
        replaced.text = "replaced"
        await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[replaced], replace_documents=True))
        assert await search() == ["replaced"]
        await stub.Delete(indexer_pb2.DeleteRequest(document_ids=["doc"]))
        assert await search() == []
