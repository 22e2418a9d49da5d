"""The shards' log on the real mesh (embedded nats-server, 2 shards × 2 replicas, Redis): writes are
acknowledged by the log with a sequence, two routers writing the same documents leave every replica
identical, a replica killed mid-ingest costs no file and is restarted by the supervisor, NATS down
fails writes with UNAVAILABLE naming it while searches go on, and the answer cache is never stale."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from mesh.launcher import Child, Supervisor, start_child, stop_all, wait_ready
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from ragloom.router.v1 import router_pb2, router_pb2_grpc
from tests.support.mesh import LocalMesh
from tests.support.ports import free_port_block
from tests.support.redis import RedisProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def redis_process(tmp_path_factory):
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))  # its data outlives a stop
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, redis_process):
    with LocalMesh(tmp_path_factory.mktemp("log"), shards=2, replicas=2,
                   redis_url=f"redis://127.0.0.1:{redis_process.port}/0") as m:
        yield m


def stub(address: str):
    return router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(address))


def doc(i: int, version: str = "a") -> router_pb2.Document:
    return router_pb2.Document(id=f"note-{i}", source=f"notes/note-{i}.txt",
                               text=f"Note {i}, version {version}: the lighthouse keeper trims wick number {i}.")


def replica_contents(mesh, name: str) -> set[tuple[str, str]]:
    with grpc.insecure_channel(mesh.child(name).address) as channel:
        shard = indexer_pb2_grpc.IndexerServiceStub(channel)
        stats = shard.Stats(indexer_pb2.StatsRequest(), timeout=10)
        if not stats.live_chunks:
            return set()
        query = indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=np.full(384, 0.05).tolist())],
                                          k=int(stats.live_chunks), ef=2000)
        return {(h.chunk_id, h.text) for h in shard.Search(query, timeout=30).results[0].hits}


def caught_up(mesh, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    names = [c.name for c in mesh.children if c.name.startswith("indexer-")]
    while time.monotonic() < deadline:
        stats = {}
        for name in names:
            with grpc.insecure_channel(mesh.child(name).address) as channel:
                stats[name] = indexer_pb2_grpc.IndexerServiceStub(channel).Stats(indexer_pb2.StatsRequest(), timeout=10)
        if all(s.log_sequence == s.log_last_sequence for s in stats.values()) and \
                len({(n[:9], s.log_sequence) for n, s in stats.items()}) == 2:
            return
        time.sleep(0.1)
    raise AssertionError(f"replicas not caught up: {[(n, s.log_sequence, s.log_last_sequence) for n, s in stats.items()]}")


def assert_replicas_identical(mesh) -> None:
    caught_up(mesh)
    for shard in (0, 1):
        assert replica_contents(mesh, f"indexer-{shard}-r0") == replica_contents(mesh, f"indexer-{shard}-r1")


def test_writes_return_log_sequences_and_a_retry_is_one_entry(mesh):
    router = stub(mesh.router)
    first = router.Ingest(router_pb2.IngestRequest(documents=[doc(i) for i in range(6)]), timeout=60)
    assert set(first.sequences) == {d.shard_id for d in first.documents} and all(first.sequences.values())
    # read your writes: a search right after the ingest sees every document
    hits = router.Search(router_pb2.SearchRequest(query="lighthouse keeper wick", top_k=10, mode=2,
                                                  min_sequences=first.sequences), timeout=30).hits
    assert {h.document_id for h in hits} >= {f"note-{i}" for i in range(6)}
    again = router.Ingest(router_pb2.IngestRequest(documents=[doc(i) for i in range(6)]), timeout=60)
    assert dict(again.sequences) == dict(first.sequences)  # the same content: the same entries
    assert all(d.replaced_chunks == d.chunks for d in again.documents)


def test_two_routers_writing_the_same_documents_leave_every_replica_identical(mesh, tmp_path):
    router = mesh.child("router")
    port = free_port_block(1)
    argv = list(router.argv)
    argv[argv.index("--port") + 1] = str(port)
    second = Child("router-2", f"127.0.0.1:{port}", argv, tmp_path / "router-2.log", env=router.env)
    start_child(second)
    try:
        asyncio.run(wait_ready([second], 120, quiet=True))
        failures = []

        def churn(address: str, version: str) -> None:
            client = stub(address)
            for round_ in range(8):
                try:
                    client.Ingest(router_pb2.IngestRequest(documents=[doc(i, f"{version}{round_}") for i in range(10, 22)]),
                                  timeout=60)
                    client.DeleteDocument(router_pb2.DeleteDocumentRequest(document_id=f"note-{10 + round_}"), timeout=30)
                except grpc.RpcError as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=churn, args=(a, v)) for a, v in ((mesh.router, "x"), (second.address, "y"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        assert_replicas_identical(mesh)
    finally:
        stop_all([second])


def test_a_replica_killed_mid_ingest_costs_no_file_and_is_restarted(mesh):
    router = stub(mesh.router)
    victim = mesh.child("indexer-0-r0")
    supervisor, stop = Supervisor([victim]), threading.Event()

    def supervise():
        while not stop.is_set():
            supervisor.tick()
            time.sleep(0.1)

    watcher = threading.Thread(target=supervise)
    watcher.start()
    try:
        def one(i: int):
            return router.Ingest(router_pb2.IngestRequest(documents=[doc(100 + i)]), timeout=60)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, i) for i in range(200)]
            deadline = time.monotonic() + 60
            while sum(f.done() for f in futures) < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            victim.process.kill()  # mid-ingest: most files are still to come
            killed_after = sum(f.done() for f in futures)
            results = [f.exception() for f in futures]
        assert killed_after < 150 and [r for r in results if r is not None] == []
        deadline = time.monotonic() + 60
        while (supervisor.restarts == 0 or victim.name in supervisor.due) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert supervisor.restarts == 1 and victim.process.poll() is None
        asyncio.run(wait_ready([victim], 120, quiet=True))
        assert_replicas_identical(mesh)
    finally:
        stop.set()
        watcher.join()


def test_nats_down_fails_writes_naming_it_and_searches_go_on(mesh):
    router = stub(mesh.router)
    nats = mesh.child("nats")
    nats.process.kill()
    nats.process.wait()
    try:
        with pytest.raises(grpc.RpcError) as info:
            router.Ingest(router_pb2.IngestRequest(documents=[doc(900)]), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "NATS" in info.value.details()
        reply = router.Search(router_pb2.SearchRequest(query="lighthouse keeper wick", top_k=3), timeout=30)
        assert reply.hits and not reply.coverage.partial
    finally:
        mesh.restart("nats", kill=False)
    deadline = time.monotonic() + 30
    while True:  # the router reconnects by itself
        try:
            router.Ingest(router_pb2.IngestRequest(documents=[doc(900)]), timeout=30)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_cached_answer_about_a_deleted_document_is_never_served(mesh, redis_process):
    router = stub(mesh.router)
    router.Ingest(router_pb2.IngestRequest(documents=[
        router_pb2.Document(id="ferry", source="ferry.txt",
                            text="The night ferry to Skerry Island leaves at nine from pier four."),
        router_pb2.Document(id="harbour", source="harbour.txt",
                            text="The harbour master keeps the tide tables in the stone office by the quay.")]),
        timeout=60)
    question = router_pb2.AskRequest(question="When does the night ferry to Skerry Island leave?", max_tokens=24)
    first = router.Ask(question, timeout=120)
    assert not first.coverage.partial and any(s.document_id == "ferry" for s in first.sources)
    deadline = time.monotonic() + 15  # the cache may still be bypassed for a moment after the log's outage
    while not router.Ask(question, timeout=120).cached:
        assert time.monotonic() < deadline, "the answer is never cached"
        time.sleep(0.5)
    # The cache's store is down (its data kept) while the document is deleted and the router restarts:
    # a bump kept only in the router's memory would be lost, and the cached answer served stale.
    redis_process.stop()
    try:
        router.DeleteDocument(router_pb2.DeleteDocumentRequest(document_id="ferry"), timeout=30)
        mesh.restart("router")
    finally:
        redis_process.start()
    router = stub(mesh.router)
    reply = router.Ask(question, timeout=120)
    assert not reply.cached and all(s.document_id != "ferry" for s in reply.sources)
