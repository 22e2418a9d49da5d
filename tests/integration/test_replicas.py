"""Two replicas per shard: a replica killed under query load costs no query, and catches up when it returns."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from tests.support.mesh import LocalMesh
from tests.support.waiting import until
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from ragloom.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "router" / "samples"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with LocalMesh(tmp_path_factory.mktemp("replicas"), shards=2, replicas=2) as m:
        with grpc.insecure_channel(m.router) as channel:
            docs = [router_pb2.Document(source=str(p), content=p.read_bytes()) for p in sorted(SAMPLES.iterdir())]
            router_pb2_grpc.RouterServiceStub(channel).Ingest(router_pb2.IngestRequest(documents=docs), timeout=120)
        yield m


def stats(mesh, name: str) -> indexer_pb2.StatsResponse:
    with grpc.insecure_channel(mesh.child(name).address) as channel:
        return indexer_pb2_grpc.IndexerServiceStub(channel).Stats(indexer_pb2.StatsRequest(), timeout=5)


def test_killing_a_replica_under_load_fails_no_query(mesh):
    questions = ["how do bees communicate", "who deciphered hieroglyphs", "what is slow start", "Everest height"]
    failures, answered = [], 0

    async def load(stop: asyncio.Event):
        async with grpc.aio.insecure_channel(mesh.router) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)

            async def client(i: int):
                nonlocal answered
                n = i
                while not stop.is_set():
                    try:
                        reply = await stub.Search(router_pb2.SearchRequest(query=questions[n % 4], top_k=5,
                                                                           require_complete=True), timeout=10)
                        assert reply.hits and not reply.coverage.partial
                        answered += 1
                    except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                        failures.append(repr(exc))
                    n += 1

            await asyncio.gather(*(client(i) for i in range(4)))

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        await until(lambda: answered >= 20 or task.done(), 60, "searches answered before the kill")
        victim = mesh.child("indexer-0-r0").process
        victim.kill()
        await asyncio.to_thread(victim.wait)
        before = answered
        await until(lambda: answered >= before + 40 or task.done(), 60, "searches answered after the kill")
        stop.set()
        await task

    asyncio.run(scenario())
    assert answered >= 60 and failures == [], failures[:5]


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory):
    """One shard, three replicas: the majority (2) still acknowledges writes with one replica down."""
    with LocalMesh(tmp_path_factory.mktemp("replicas3"), shards=1, replicas=3) as m:
        yield m


def test_returning_replica_converges_with_its_peers(mesh3):
    down = mesh3.child("indexer-0-r0")
    with grpc.insecure_channel(mesh3.router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        stub.Ingest(router_pb2.IngestRequest(documents=[
            router_pb2.Document(id=f"early-{i}", text=f"Early note {i} about bees and hives.") for i in range(5)]), timeout=60)
        down.process.kill()
        down.process.wait()
        for i in range(12):  # written while r0 is down: acknowledged by r1 and r2
            stub.Ingest(router_pb2.IngestRequest(documents=[
                router_pb2.Document(id=f"late-{i}", text=f"Late note {i} about lighthouse lamps and wicks.")]), timeout=30)
        assert stub.DeleteDocument(router_pb2.DeleteDocumentRequest(document_id="early-0"), timeout=30).removed_chunks == 1
    mesh3.restart("indexer-0-r0", kill=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = [(s.live_chunks, s.documents) for s in (stats(mesh3, f"indexer-0-r{r}") for r in range(3))]
        if len(set(counts)) == 1:
            break
        time.sleep(0.5)
    assert len(set(counts)) == 1 and counts[0] == (16, 16), counts
    query = indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=[0.05] * 384)], k=50)
    results = []
    for r in range(3):
        with grpc.insecure_channel(mesh3.child(f"indexer-0-r{r}").address) as channel:
            hits = indexer_pb2_grpc.IndexerServiceStub(channel).Search(query, timeout=5).results[0].hits
        results.append(sorted(h.chunk_id for h in hits))
    assert results[0] == results[1] == results[2]
    assert "early-0#0" not in results[0] and "late-11#0" in results[0]
