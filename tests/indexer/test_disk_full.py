"""A standalone shard on a full disk says so (RESOURCE_EXHAUSTED naming the shard and its folder, never
INTERNAL OperationalError) and writes again once space is freed; numbers out of range are the caller's."""

from __future__ import annotations

import errno

import grpc
import pytest

from fabric.errors import DiskFull
from indexer import convert
from indexer.server import IndexerService
from indexer.store import ShardStore
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from tests.indexer.test_log import small_disk
from tests.indexer.test_server import chunk, running, settings_for, unit_vectors

VECTORS = unit_vectors(400)


def document(i: int) -> indexer_pb2.UpsertRequest:
    """~20 KB of text: a few dozen fill a 1 MB disk."""
    return indexer_pb2.UpsertRequest(
        chunks=[indexer_pb2.Chunk(chunk_id=f"doc-{i}#{j}", document_id=f"doc-{i}", text=f"{i} " + "w" * 5000,
                                  vector=VECTORS[(4 * i + j) % len(VECTORS)]) for j in range(4)],
        replace_documents=True, shard_id=1,
    )


async def test_an_upsert_on_a_full_disk_is_resource_exhausted_naming_the_shard_and_its_folder(tmp_path):
    with small_disk(tmp_path / "small", "1m") as resize:
        settings = settings_for(tmp_path / "small", shard_id=1)
        async with running(settings) as channel:
            stub = indexer_pb2_grpc.IndexerServiceStub(channel)
            for i in range(200):
                try:
                    await stub.Upsert(document(i), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
            else:
                pytest.fail("a 1 MB disk never filled")
            assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
            assert refused.details().startswith(f"shard 1: the disk holding {settings.data_dir} is full: ")
            held = (await stub.Stats(indexer_pb2.StatsRequest(), timeout=10)).documents
            assert held == i  # the refused write left nothing behind
            resize("64m")
            reply = await stub.Upsert(document(i), timeout=10)
            assert reply.upserted == 4
            assert (await stub.Stats(indexer_pb2.StatsRequest(), timeout=10)).documents == i + 1


async def test_a_snapshot_on_a_full_disk_is_disk_full_and_leaves_no_copy_behind(tmp_path, monkeypatch):
    service = IndexerService(settings_for(tmp_path, shard_id=3))
    await service.start()
    try:
        await service.write(ShardStore.upsert, [convert.chunk_record(chunk(i, VECTORS[i])) for i in range(3)])

        def no_room(self, staged):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ShardStore, "publish_snapshot", no_room)
        with pytest.raises(DiskFull, match=r"^shard 3: the disk holding .* is full: \[Errno 28\]"):
            await service.snapshot()
        assert not list((tmp_path / "shard" / "snapshots").glob("*.tmp"))
    finally:
        await service.close()


@pytest.mark.parametrize("method, request_", [
    ("Upsert", indexer_pb2.UpsertRequest(chunks=[chunk(0, VECTORS[0])], version=2**64 - 1)),
    ("Upsert", indexer_pb2.UpsertRequest(chunks=[chunk(0, VECTORS[0])], version=2**63)),
    ("Delete", indexer_pb2.DeleteRequest(document_ids=["doc"], version=2**63)),
], ids=["upsert-uint64-max", "upsert-past-sqlite", "delete-past-sqlite"])
async def test_a_version_sqlite_cannot_hold_is_invalid_argument(tmp_path, method, request_):
    async with running(settings_for(tmp_path)) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await getattr(stub, method)(request_, timeout=10)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("version: must be between 1 and 9223372036854775807")


async def test_the_largest_version_is_taken_and_then_a_stamped_write_is_refused_not_broken(tmp_path):
    async with running(settings_for(tmp_path)) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        top = await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(0, VECTORS[0])], version=2**63 - 1))
        assert top.version == 2**63 - 1
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(1, VECTORS[1])]), timeout=10)
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_huge_sequence_and_breadth_numbers_are_answered_not_internal(tmp_path):
    async with running(settings_for(tmp_path)) as channel:
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)
        await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[chunk(i, VECTORS[i]) for i in range(3)]))
        query = indexer_pb2.Vector(values=VECTORS[0])
        dense = await stub.Search(indexer_pb2.SearchRequest(queries=[query], k=2, ef=2**32 - 1,
                                                            min_sequence=2**64 - 1), timeout=10)
        lexical = await stub.LexicalSearch(indexer_pb2.LexicalSearchRequest(queries=["chunk"], k=2,
                                                                            min_sequence=2**64 - 1), timeout=10)
        assert len(dense.results[0].hits) == 2 and len(lexical.results[0].hits) == 2
