"""The shards' log on a 3-server NATS cluster (streams and the generations bucket on 3 Raft replicas),
2 shards × 2 replicas: kill -9 one NATS server and one shard replica during a 500-document ingest, and still every
acknowledged document is on every replica, the replicas identical, and a require_complete search load
goes on without a failed query."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from ragloom.router.v1 import router_pb2
from tests.integration.test_shard_log import assert_replicas_identical, doc, replica_contents, stub
from tests.support.mesh import LocalMesh
from tests.support.nats import NatsCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nats = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield nats
    nats.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, cluster):
    with LocalMesh(tmp_path_factory.mktemp("clustered"), shards=2, replicas=2, nats_url=cluster.url,
                   log_replicas=3) as m:
        yield m


def ingest_until_acknowledged(router, i: int, deadline_s: float = 90) -> None:
    """As a client does: retry a failed ingest (the log electing a leader, say) until it is acknowledged."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            router.Ingest(router_pb2.IngestRequest(documents=[doc(i)]), timeout=30)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                raise
            time.sleep(0.3)


def test_a_nats_server_and_a_replica_killed_mid_ingest_lose_no_acknowledged_document(mesh, cluster):
    router = stub(mesh.router)
    for i in range(10):
        ingest_until_acknowledged(router, i)
    failures, answered, stop = [], [0], threading.Event()

    def search_load():
        client = stub(mesh.router)
        while not stop.is_set():
            try:
                reply = client.Search(router_pb2.SearchRequest(query="lighthouse keeper wick", top_k=5,
                                                               require_complete=True), timeout=20)
                assert reply.hits and not reply.coverage.partial
                answered[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure fails the test
                failures.append(repr(exc))

    loaders = [threading.Thread(target=search_load) for _ in range(2)]
    for t in loaders:
        t.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ingest_until_acknowledged, router, i) for i in range(10, 510)]
            while sum(f.done() for f in futures) < 40:
                time.sleep(0.01)
            cluster.nodes[0].kill()  # one of three NATS servers: the streams keep a Raft majority
            mesh.child("indexer-1-r0").process.kill()
            for f in futures:
                f.result()
        mesh.restart("indexer-1-r0", kill=False)
    finally:
        stop.set()
        for t in loaders:
            t.join()
    assert answered[0] > 20 and failures == [], failures[:3]
    assert_replicas_identical(mesh)
    held = replica_contents(mesh, "indexer-0-r0") | replica_contents(mesh, "indexer-1-r0")
    assert {chunk_id.split("#")[0] for chunk_id, _ in held} >= {f"note-{i}" for i in range(510)}
