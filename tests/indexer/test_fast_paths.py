"""The shard's fast paths answer exactly what the general ones answer, and step aside when they cannot."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest

from indexer import convert
from indexer.filters import SearchFilter
from indexer.server import IndexerService
from indexer.store import ChunkRecord, ShardStore
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from tests.indexer.test_server import DIM, running, settings_for


def vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def records(vs: np.ndarray, tenant: str = "", tag: str = "") -> list[ChunkRecord]:
    return [ChunkRecord(chunk_id=f"{tenant}c{i}", document_id=f"{tenant}d{i}", vector=v, text=f"{tenant} words {i}",
                        source="s", tenant=tenant, tags=[tag] if tag and i % 2 else []) for i, v in enumerate(vs)]


@pytest.fixture
def store(tmp_path):
    s = ShardStore(tmp_path / "shard", DIM)
    yield s
    s.close()


async def upsert(stub, chunks: list[ChunkRecord]) -> None:
    await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[convert.chunk_message(r) for r in chunks]))


def ids(results) -> list[list[str]]:
    return [[h.chunk_id for h in hits] for hits in results]


def test_quick_search_finds_what_search_finds(store):
    store.upsert(records(vectors(200), tag="t"))
    queries = vectors(5, seed=1)
    quick = store.quick_search(queries, 10, 64)
    assert quick is not None and ids(quick) == ids(store.search(queries, 10, 64))
    assert [[h.score for h in hits] for hits in quick] == [[h.score for h in hits] for hits in store.search(queries, 10, 64)]


def test_quick_search_steps_aside_for_a_filter_that_narrows_the_index(store):
    store.upsert(records(vectors(50), tag="t"))
    assert store.quick_search(vectors(1, seed=1), 5, 64, SearchFilter(tags=frozenset({"t"}))) is None
    store.upsert(records(vectors(50, seed=2), tenant="other"))
    # Two tenants: each tenant's search is a filter inside hnswlib, which is the store thread's work.
    assert store.quick_search(vectors(1, seed=1), 5, 64) is None
    assert store.quick_search(vectors(1, seed=1), 5, 64, SearchFilter(tenant="nobody")) is None


def test_lexical_search_of_matches_lexical_search(store):
    store.upsert(records(vectors(30), tag="t"))
    where = SearchFilter(tags=frozenset({"t"}))
    assert ids(store.lexical_search_of(store.allowed(where), ["words 3"], 5, "")) == \
        ids(store.lexical_search(["words 3"], 5, where))


async def test_inline_runs_only_while_the_store_thread_is_idle(tmp_path):
    service = IndexerService(settings_for(tmp_path))
    await service.start()
    try:
        assert service.inline(lambda store: "here") == "here"
        entered, release = threading.Event(), threading.Event()

        def busy(store):
            entered.set()
            release.wait(5)

        running_call = asyncio.ensure_future(service.run(busy))
        await asyncio.to_thread(entered.wait, 5)
        assert service.inline(lambda store: "here") is None  # the store's thread is in a call
        release.set()
        await running_call
        assert service.inline(lambda store: "here") == "here"
    finally:
        await service.close()


@pytest.mark.parametrize("inline_search", [0, 256])
async def test_search_and_lexical_through_grpc_agree_with_and_without_the_fast_path(tmp_path, inline_search):
    vs = vectors(40)
    async with running(settings_for(tmp_path, inline_search=inline_search)) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        await upsert(stub, records(vs, tag="t"))
        dense = await stub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=vs[3].tolist())], k=3))
        assert dense.results[0].hits[0].chunk_id == "c3"
        tagged = await stub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=vs[3].tolist())], k=3,
                                                             tags=["t"]))
        assert all(int(h.chunk_id[1:]) % 2 for h in tagged.results[0].hits)
        lexical = await stub.LexicalSearch(indexer_pb2.LexicalSearchRequest(queries=["words 7"], k=2, tags=["t"]))
        assert lexical.results[0].hits[0].chunk_id == "c7"
        await stub.Delete(indexer_pb2.DeleteRequest(document_ids=["d3", "d7"]))
        dense = await stub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=vs[3].tolist())], k=3))
        assert "c3" not in [h.chunk_id for h in dense.results[0].hits]
        lexical = await stub.LexicalSearch(indexer_pb2.LexicalSearchRequest(queries=["words 7"], k=2, tags=["t"]))
        assert "c7" not in [h.chunk_id for h in lexical.results[0].hits]


@pytest.mark.parametrize("inline_search", [0, 256])
async def test_search_with_texts_answers_both_halves_of_hybrid_in_one_call(tmp_path, inline_search):
    vs = vectors(40)
    async with running(settings_for(tmp_path, inline_search=inline_search)) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        await upsert(stub, records(vs, tag="t"))
        query = indexer_pb2.Vector(values=vs[3].tolist())
        both = await stub.Search(indexer_pb2.SearchRequest(queries=[query], k=3, tags=["t"], texts=["words 7"]))
        dense = await stub.Search(indexer_pb2.SearchRequest(queries=[query], k=3, tags=["t"]))
        lexical = await stub.LexicalSearch(indexer_pb2.LexicalSearchRequest(queries=["words 7"], k=3, tags=["t"]))
        assert list(both.results) == list(dense.results)
        assert list(both.lexical_results) == list(lexical.results) and both.lexical_results[0].hits[0].chunk_id == "c7"
        assert not dense.lexical_results  # none asked, none sent
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Search(indexer_pb2.SearchRequest(queries=[query], k=3, texts=["  "]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "texts[0]" in refused.value.details()
