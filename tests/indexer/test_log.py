"""Shard replicas as views of their shard's log (a real nats-server with JetStream, real indexer
processes): they apply it in order, converge after a kill -9, rebuild from it when wiped, read their
writes with min_sequence, take no direct writes, and see a document split into parts whole."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess

import grpc
import numpy as np
import pytest

from fabric.shardlog import LogSettings
from ragloom.indexer.v1 import indexer_pb2
from router.domain import ChunkWrite
from router.shardlog import ShardLog
from tests.indexer.shards import ShardProcess, unit_vectors
from tests.support.nats import NatsProcess
from tests.support.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DIM = 16
VECTORS = unit_vectors(2000, DIM, seed=5)


def chunks(doc: str, n: int, offset: int = 0, text: str = "", tenant: str = "") -> list[ChunkWrite]:
    return [ChunkWrite(chunk_id=f"{doc}#{i}", document_id=doc, text=text or f"{doc} part {i}", source=f"{doc}.txt",
                       vector=VECTORS[(offset + i) % len(VECTORS)].tolist(), tenant=tenant) for i in range(n)]


@pytest.fixture
def nats(tmp_path):
    server = NatsProcess(tmp_path / "nats").start()
    yield server
    server.stop()


def replica(tmp_path, name: str, nats: NatsProcess, shard: int = 0) -> ShardProcess:
    return ShardProcess(tmp_path / name, DIM, "--shard-id", str(shard), "--nats-url", nats.url,
                        "--snapshot-every", "50")


async def chunk_set(stub, tenant: str = "", min_sequence: int = 0) -> set[tuple[str, str]]:
    """(chunk id, text) of every chunk a replica holds in `tenant` (a search as wide as the shard), once
    it has applied the log through `min_sequence`."""
    if min_sequence:  # a search waits for the sequence; then the count is the count at that point
        await stub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=VECTORS[0])], k=1,
                                                    min_sequence=min_sequence), timeout=30)
    stats = await stub.Stats(indexer_pb2.StatsRequest(), timeout=10)
    if not stats.live_chunks:
        return set()
    reply = await stub.Search(indexer_pb2.SearchRequest(
        queries=[indexer_pb2.Vector(values=VECTORS[0])], k=int(stats.live_chunks), ef=2000, tenant=tenant,
    ), timeout=30)
    return {(h.chunk_id, h.text) for h in reply.results[0].hits}


async def applied(stub) -> int:
    return (await stub.Stats(indexer_pb2.StatsRequest(), timeout=10)).log_sequence


async def test_replicas_follow_the_log_and_a_killed_one_converges_on_return(tmp_path, nats):
    log = ShardLog(LogSettings(nats.url), shards=1)
    a, b = replica(tmp_path, "a", nats), replica(tmp_path, "b", nats)
    stub_a, stub_b = await a.start(), await b.start()
    last = 0
    for i in range(20):
        last = (await log.write_document(0, "", f"doc-{i}", chunks(f"doc-{i}", 3, i * 3), f"h{i}")).sequence
    b.kill()  # nothing flushed, closed or snapshotted
    for i in range(20, 40):  # written while b is down
        last = (await log.write_document(0, "", f"doc-{i}", chunks(f"doc-{i}", 3, i * 3), f"h{i}")).sequence
    for i in range(0, 10):
        last = (await log.delete_document(0, "", f"doc-{i}")).sequence
    last = (await log.write_document(0, "", "doc-20", chunks("doc-20", 1, 7, text="rewritten"), "h20b")).sequence
    stub_b = await b.start()  # SERVING only once caught up with the log
    assert await applied(stub_b) == last
    held_a, held_b = await chunk_set(stub_a, min_sequence=last), await chunk_set(stub_b)
    assert held_a == held_b and len(held_a) == 30 * 3 - 2
    assert ("doc-20#0", "rewritten") in held_a and not any(c.startswith("doc-3#") for c, _ in held_a)
    await asyncio.gather(a.close(), b.close())
    await log.close()


async def test_a_wiped_replica_rebuilds_by_replaying_the_log(tmp_path, nats):
    log = ShardLog(LogSettings(nats.url), shards=1)
    a = replica(tmp_path, "a", nats)
    stub = await a.start()
    for i in range(30):
        await log.write_document(0, "acme", f"doc-{i}", chunks(f"doc-{i}", 2, i, tenant="acme"), f"h{i}")
    last = (await log.delete_document(0, "acme", "doc-0")).sequence
    before = await chunk_set(stub, "acme", last)
    a.kill()
    shutil.rmtree(tmp_path / "a")
    stub = await a.start()
    assert await chunk_set(stub, "acme") == before and len(before) == 58
    await a.close()
    await log.close()


async def test_reads_wait_for_their_sequence_and_direct_writes_are_refused(tmp_path, nats):
    log = ShardLog(LogSettings(nats.url), shards=1)
    a = replica(tmp_path, "a", nats)
    stub = await a.start()
    ack = await log.write_document(0, "", "doc", chunks("doc", 2), "h")
    query = indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=VECTORS[0])], k=5, min_sequence=ack.sequence)
    reply = await stub.Search(query, timeout=10)
    assert {h.chunk_id for h in reply.results[0].hits} == {"doc#0", "doc#1"}
    query.min_sequence = ack.sequence + 100  # a write this replica has not seen (yet)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Search(query, timeout=1.5)
    assert info.value.code() == grpc.StatusCode.ABORTED and "not yet" in info.value.details()  # behind, not down
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Upsert(indexer_pb2.UpsertRequest(chunks=[indexer_pb2.Chunk(
            chunk_id="x#0", document_id="x", vector=VECTORS[1])]), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "log" in info.value.details()
    # the same content again is the same entry: nothing new in the log
    again = await log.write_document(0, "", "doc", chunks("doc", 2), "h")
    assert again.unchanged and again.sequence == ack.sequence and again.previous_chunks == 2
    await a.close()
    await log.close()


async def test_a_document_bigger_than_one_message_is_applied_whole(tmp_path):
    nats = NatsProcess(tmp_path / "nats", max_payload="64KB").start()
    try:
        log = ShardLog(LogSettings(nats.url), shards=1)
        a = replica(tmp_path, "a", nats)
        stub = await a.start()
        big = chunks("big", 400, text="x" * 400)  # ~200 KB of text and vectors: several parts
        ack = await log.write_document(0, "", "big", big, "v1")
        reply = await stub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=VECTORS[0])], k=1000,
                                                            ef=1000, min_sequence=ack.sequence), timeout=30)
        assert len(reply.results[0].hits) == 400
        smaller = chunks("big", 150, text="y" * 400)  # replaced by fewer parts: none of the old is left
        ack = await log.write_document(0, "", "big", smaller, "v2")
        reply = await stub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=VECTORS[0])], k=1000,
                                                            ef=1000, min_sequence=ack.sequence), timeout=30)
        assert len(reply.results[0].hits) == 150 and {h.text for h in reply.results[0].hits} == {"y" * 400}
        # a replica rebuilt from the (compacted) stream sees the current document only
        b = replica(tmp_path, "b", nats)
        stub_b = await b.start()
        assert await chunk_set(stub_b) == await chunk_set(stub, min_sequence=ack.sequence)
        await asyncio.gather(a.close(), b.close())
        await log.close()
    finally:
        nats.stop()


@contextlib.contextmanager
def small_disk(path, size: str):
    """A tmpfs of `size` mounted at `path` (needs root; the test skips without it)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


async def serving(stub_channel_address: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(stub_channel_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


async def test_a_full_disk_stops_a_replica_clearly_and_it_catches_up_when_space_is_freed(tmp_path, nats):
    from grpc_health.v1 import health_pb2

    log = ShardLog(LogSettings(nats.url), shards=1)
    with small_disk(tmp_path / "small", "1m") as resize:
        a = ShardProcess(tmp_path / "small" / "a", DIM, "--shard-id", "0", "--nats-url", nats.url)
        b = replica(tmp_path, "b", nats)
        stub_a, stub_b = await a.start(), await b.start()
        last = 0
        for i in range(80):  # ~20 KB of text each: far more than the replica's 1 MB disk
            ack = await log.write_document(0, "", f"doc-{i}", chunks(f"doc-{i}", 4, i * 4, text=f"{i} " + "w" * 5000),
                                           f"h{i}")
            last = ack.sequence  # every write acknowledged by the log, whatever one replica's disk says
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (await stub_a.Stats(indexer_pb2.StatsRequest(), timeout=10)).apply_error:
            assert loop.time() < deadline, "the full disk was never reported"
            await asyncio.sleep(0.2)
        stats = await stub_a.Stats(indexer_pb2.StatsRequest(), timeout=10)
        assert stats.log_sequence < last
        assert stats.apply_error.startswith(f"shard 0: the disk holding {tmp_path / 'small' / 'a'} is full: ")
        assert await serving(a.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        resize("64m")
        while (await stub_a.Stats(indexer_pb2.StatsRequest(), timeout=10)).log_sequence < last:
            assert loop.time() < deadline + 60, "the replica never caught up after space was freed"
            await asyncio.sleep(0.2)
        stats = await stub_a.Stats(indexer_pb2.StatsRequest(), timeout=10)
        assert not stats.apply_error and await serving(a.address) == health_pb2.HealthCheckResponse.SERVING
        assert await chunk_set(stub_a) == await chunk_set(stub_b, min_sequence=last)
        await asyncio.gather(a.close(), b.close())
    await log.close()
