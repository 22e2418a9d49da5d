"""Two replicas of a shard, each the other's peer: one misses writes while down and converges on return."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.ports import free_port_block
from ragloom.indexer.v1 import indexer_pb2

from tests.indexer.shards import ShardProcess, nearest, unit_vectors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DIM = 16
VECTORS = unit_vectors(400, DIM, seed=3)
TENANTS = ("", "acme")


def upsert(doc: str, rows: range, tenant: str = "", version: int | None = None, tags=()) -> indexer_pb2.UpsertRequest:
    request = indexer_pb2.UpsertRequest(
        chunks=[
            indexer_pb2.Chunk(chunk_id=f"{doc}#{i}", document_id=doc, text=f"{doc} {i}", vector=VECTORS[row],
                              tenant=tenant, tags=tags, source=f"file:///{doc}")
            for i, row in enumerate(rows)
        ],
        replace_documents=True,
    )
    if version is not None:
        request.version = version
    return request


class Router:
    """Writes to every replica that answers, with one version per write, as the router does."""

    def __init__(self, *replicas: ShardProcess):
        self.replicas = replicas
        self._last = 0

    def version(self) -> int:
        self._last = max(time.time_ns() // 1000, self._last + 1)
        return self._last

    async def upsert(self, up: list[ShardProcess], doc: str, rows: range, tenant: str = "", tags=()) -> None:
        request = upsert(doc, rows, tenant, self.version(), tags)
        await asyncio.gather(*(r.stub().Upsert(request, timeout=10) for r in up))

    async def delete(self, up: list[ShardProcess], doc: str, tenant: str = "") -> None:
        request = indexer_pb2.DeleteRequest(document_ids=[doc], tenant=tenant, version=self.version())
        await asyncio.gather(*(r.stub().Delete(request, timeout=10) for r in up))


async def view(replica: ShardProcess) -> tuple:
    """What a reader sees on a replica: counts, and the hits of a fixed set of searches per tenant."""
    stats = await replica.stub().Stats(indexer_pb2.StatsRequest(), timeout=10)
    hits = [await nearest(replica.stub(), VECTORS[::20], k=8, tenant=tenant) for tenant in TENANTS]
    tagged = await nearest(replica.stub(), VECTORS[:5], k=8, tags=["blue"])
    return stats.live_chunks, stats.documents, stats.tenants, stats.max_version, hits, tagged


async def converged(a: ShardProcess, b: ShardProcess, timeout_s: float = 10.0) -> tuple:
    end = time.monotonic() + timeout_s
    while True:
        seen_a, seen_b = await view(a), await view(b)
        if seen_a == seen_b or time.monotonic() > end:
            assert seen_a == seen_b
            return seen_a
        await asyncio.sleep(0.2)


async def test_a_replica_that_was_down_catches_up_before_serving_and_then_periodically(tmp_path):
    ports = free_port_block(2)
    flags = ("--catchup-interval-s", "0.5", "--snapshot-interval-s", "0")
    a = ShardProcess(tmp_path / "a", DIM, "--peers", f"127.0.0.1:{ports + 1}", *flags, port=ports)
    b = ShardProcess(tmp_path / "b", DIM, "--peers", f"127.0.0.1:{ports}", *flags, port=ports + 1)
    router = Router(a, b)
    try:
        await asyncio.gather(a.start(), b.start())
        for n in range(10):
            await router.upsert([a, b], f"doc{n}", range(n * 10, n * 10 + 10), tags=["blue"] if n % 3 == 0 else ())
        await router.upsert([a, b], "doc0", range(300, 305), tenant="acme")
        before = await converged(a, b)

        # b is down: a takes deletes, replacements and new documents in both tenants.
        b.kill()
        await router.delete([a], "doc1")
        await router.upsert([a], "doc2", range(200, 203))  # replaced by 3 new chunks
        await router.upsert([a], "doc10", range(100, 120), tags=["blue"])
        await router.upsert([a], "doc1", range(305, 310), tenant="acme")
        await router.delete([a], "doc0", tenant="acme")

        await b.start()  # SERVING only after pulling from a
        after = await converged(a, b, timeout_s=0)
        assert after != before
        live, documents, tenants, *_ = after
        # "": 100 chunks - doc1 (10) - 7 of doc2 + doc10 (20), in 10 documents; "acme": doc1 (5 chunks).
        assert (live, documents, tenants) == (108, 11, 2)

        # Now a is down and b takes a write; a, back, catches up too.
        a.kill()
        await router.upsert([b], "doc11", range(130, 135))
        await a.start()
        await converged(a, b, timeout_s=0)

        # Both up: a write that reaches only one of them (a lost message) spreads by the periodic pull.
        await router.upsert([a], "doc12", range(140, 150))
        live, *_ = await converged(a, b, timeout_s=10)
        assert live == after[0] + 5 + 10

        stats = await b.stub().Stats(indexer_pb2.StatsRequest(), timeout=10)
        [peer] = stats.peers
        assert (peer.address, peer.error) == (a.address, "")
        assert peer.HasField("caught_up_age_s")
    finally:
        await asyncio.gather(a.close(), b.close())
    for replica in (a, b):
        assert "Traceback" not in replica.log_path.read_text()
