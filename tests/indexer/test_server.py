"""The indexer behind a real aio server and channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexer.server import IndexerService, Settings, create_service
from fabric.server import serve
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc

DIM = 8
SHARD = 2


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def chunk(i: int, vector, document_id: str = "doc") -> indexer_pb2.Chunk:
    return indexer_pb2.Chunk(
        chunk_id=f"{document_id}-{i}",
        document_id=document_id,
        text=f"chunk {i}",
        source="file://doc.txt",
        metadata={"page": str(i)},
        vector=list(vector),
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[grpc.aio.Channel]:
    """Serves the indexer on a free port until the block ends; yields a channel to it."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(create_service(settings), settings, on_ready=ready.set_result, stop=stop))
    try:
        await asyncio.wait({ready, server}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            server.result()  # the server failed to start: raise its error
        port = ready.result()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=10)


def settings_for(tmp_path, **overrides) -> Settings:
    return Settings(port=0, grace_s=0.5, data_dir=tmp_path / "shard", dimension=DIM, **overrides)


@pytest.fixture
async def channel(tmp_path):
    async with running(settings_for(tmp_path, shard_id=SHARD, max_k=50, max_batch=16)) as channel:
        yield channel


@pytest.fixture
def stub(channel) -> indexer_pb2_grpc.IndexerServiceStub:
    return indexer_pb2_grpc.IndexerServiceStub(channel)


async def test_upsert_then_search_finds_the_chunks(stub):
    vectors = unit_vectors(10)
    reply = await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(i, v) for i, v in enumerate(vectors)]))
    assert (reply.upserted, reply.removed, reply.sequence) == (10, 0, 1)

    reply = await stub.Search(
        indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=v) for v in vectors[[3, 6]]], k=2, shard_id=SHARD)
    )

    assert reply.shard_id == SHARD
    assert [len(result.hits) for result in reply.results] == [2, 2]
    top = reply.results[0].hits[0]
    assert (top.chunk_id, top.document_id, top.text, top.source, dict(top.metadata)) == (
        "doc-3", "doc", "chunk 3", "file://doc.txt", {"page": "3"},
    )
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert reply.results[1].hits[0].chunk_id == "doc-6"


async def test_replace_delete_and_stats(stub):
    vectors = unit_vectors(6)
    await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(i, v, "a") for i, v in enumerate(vectors[:4])]))
    await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(i, v, "b") for i, v in enumerate(vectors[4:])]))

    replaced = await stub.Upsert(
        indexer_pb2.UpsertRequest(chunks=[chunk(0, vectors[0], "a")], replace_documents=True)
    )
    deleted = await stub.Delete(indexer_pb2.DeleteRequest(document_ids=["b"]))
    stats = await stub.Stats(indexer_pb2.StatsRequest())

    assert (replaced.upserted, replaced.removed, replaced.sequence) == (1, 3, 3)
    assert (deleted.removed, deleted.sequence) == (2, 4)
    assert (stats.shard_id, stats.live_chunks, stats.documents, stats.dimension, stats.sequence) == (SHARD, 1, 1, DIM, 4)
    assert stats.capacity >= 1


def vector(n: int = DIM) -> indexer_pb2.Vector:
    return indexer_pb2.Vector(values=[1.0] * n)


BAD_REQUESTS = [
    ("Upsert", indexer_pb2.UpsertRequest(), "chunks"),
    ("Upsert", indexer_pb2.UpsertRequest(chunks=[chunk(i, np.ones(DIM)) for i in range(17)]), "chunks"),
    ("Upsert", indexer_pb2.UpsertRequest(chunks=[chunk(0, np.ones(DIM)), chunk(1, np.ones(3))]), "chunks[1].vector"),
    ("Upsert", indexer_pb2.UpsertRequest(chunks=[indexer_pb2.Chunk(chunk_id="x", vector=[1.0] * DIM)]), "chunks[0].document_id"),
    ("Delete", indexer_pb2.DeleteRequest(), "document_ids"),
    ("Delete", indexer_pb2.DeleteRequest(document_ids=[""]), "document_ids[0]"),
    ("Search", indexer_pb2.SearchRequest(queries=[vector()], k=0), "k"),
    ("Search", indexer_pb2.SearchRequest(queries=[vector()], k=51), "k"),
    ("Search", indexer_pb2.SearchRequest(k=1), "queries"),
    ("Search", indexer_pb2.SearchRequest(queries=[vector(), vector(DIM - 1)], k=1), "queries[1].values"),
]


async def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(stub):
    for method, request, field in BAD_REQUESTS:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await getattr(stub, method)(request)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, field)
        assert error.value.details().startswith(f"{field}:"), error.value.details()

    reply = await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(0, unit_vectors(1)[0])]))
    assert reply.upserted == 1
    assert (await stub.Stats(indexer_pb2.StatsRequest())).live_chunks == 1


async def test_requests_for_another_shard_are_refused(stub):
    requests = [
        ("Upsert", indexer_pb2.UpsertRequest(chunks=[chunk(0, np.ones(DIM))], shard_id=SHARD + 1)),
        ("Delete", indexer_pb2.DeleteRequest(document_ids=["doc"], shard_id=0)),
        ("Search", indexer_pb2.SearchRequest(queries=[vector()], k=1, shard_id=0)),
    ]
    for method, request in requests:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await getattr(stub, method)(request)
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION, method

    assert (await stub.Stats(indexer_pb2.StatsRequest())).sequence == 0


async def test_health_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", *IndexerService.service_names):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_data_survives_a_restart(tmp_path):
    vectors = unit_vectors(3)
    async with running(settings_for(tmp_path)) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(i, v) for i, v in enumerate(vectors)]))

    async with running(settings_for(tmp_path)) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        reply = await stub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=vectors[2])], k=1))

    assert reply.results[0].hits[0].chunk_id == "doc-2"
    assert reply.shard_id == 0


def test_settings_read_paths_and_numbers_from_flags(tmp_path):
    settings = Settings.from_args(["--data-dir", str(tmp_path), "--shard-id", "3"], environ={"RAGLOOM_INDEXER_MAX_K": "7", "RAGLOOM_MAX_K": "9"})

    assert (settings.data_dir, settings.shard_id, settings.max_k, settings.dimension) == (tmp_path, 3, 7, 384)
    with pytest.raises(ValueError, match="max_batch"):
        Settings.from_args(["--max-batch", "0"], environ={})


def tenant_chunk(i: int, vector, tenant: str, tags=()) -> indexer_pb2.Chunk:
    return indexer_pb2.Chunk(chunk_id=f"c{i}", document_id=f"d{i}", text=f"{tenant} {i}", source=f"file:///{i}",
                             vector=list(vector), tenant=tenant, tags=tags)


async def test_tenants_and_filters_through_grpc(stub):
    vectors = unit_vectors(12)
    await stub.Upsert(indexer_pb2.UpsertRequest(
        chunks=[tenant_chunk(i, v, "A", tags=["even"] if i % 2 == 0 else []) for i, v in enumerate(vectors[:6])]))
    await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[tenant_chunk(i, v, "B") for i, v in enumerate(vectors[6:])]))

    def search(**fields):
        return stub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=vectors[7])], k=10, **fields))

    b_only = (await search(tenant="B")).results[0].hits
    a_even = (await search(tenant="A", tags=["even"])).results[0].hits
    a_prefix = (await search(tenant="A", source_prefix="file:///1")).results[0].hits
    default = (await search()).results[0].hits

    assert {(h.tenant, h.text.split()[0]) for h in b_only} == {("B", "B")} and len(b_only) == 6
    assert sorted(h.chunk_id for h in a_even) == ["c0", "c2", "c4"] and all(list(h.tags) == ["even"] for h in a_even)
    assert [h.chunk_id for h in a_prefix] == ["c1"]
    assert default == []

    deleted = await stub.Delete(indexer_pb2.DeleteRequest(document_ids=["d1", "d2"], tenant="B"))
    assert deleted.removed == 2
    assert len((await search(tenant="A")).results[0].hits) == 6

    mixed = indexer_pb2.UpsertRequest(chunks=[tenant_chunk(0, vectors[0], "A"), tenant_chunk(1, vectors[1], "B")])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Upsert(mixed)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("chunks[1].tenant:")


async def test_versions_through_grpc(stub):
    vectors = unit_vectors(2)
    newer = await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(0, vectors[0])], version=200))
    older = await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(0, vectors[1])], version=100))
    stamped = await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(1, vectors[1])]))
    stale_delete = await stub.Delete(indexer_pb2.DeleteRequest(document_ids=["doc"], version=150))
    stats = await stub.Stats(indexer_pb2.StatsRequest())

    assert (newer.version, newer.upserted, newer.skipped) == (200, 1, 0)
    assert (older.version, older.upserted, older.skipped) == (100, 0, 1)
    assert stamped.version > 200 and stamped.upserted == 1
    assert (stale_delete.version, stale_delete.removed) == (150, 0)  # both chunks are newer than the delete
    assert (stats.live_chunks, stats.max_version) == (2, stamped.version)


async def test_stats_report_snapshots_memory_and_deletions(tmp_path):
    async with running(settings_for(tmp_path, snapshot_every=1)) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(i, v) for i, v in enumerate(unit_vectors(5))]))
        await stub.Delete(indexer_pb2.DeleteRequest(document_ids=["doc"]))
        for _ in range(100):
            stats = await stub.Stats(indexer_pb2.StatsRequest())
            if stats.snapshot_sequence == stats.sequence:
                break
            await asyncio.sleep(0.05)

    assert stats.snapshot_sequence == stats.sequence == 2
    assert 0 <= stats.snapshot_age_s < 10
    assert (stats.live_chunks, stats.deleted_chunks, stats.tenants) == (0, 5, 0)
    assert stats.index_bytes > 0 and stats.rss_bytes > stats.index_bytes
    assert stats.max_version > 0 and stats.store_id > 0
