"""Router behaviour on real processes with a real Redis: cache, single-flight, Redis outage, partial results, tenants."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.support.mesh import LocalMesh
from tests.support.ports import free_port_block
from tests.support.redis import RedisProcess
from ragloom.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "router" / "samples"


@pytest.fixture(scope="module")
def redis_process():
    redis = RedisProcess()
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, redis_process):
    metrics_port = free_port_block(1)
    m = LocalMesh(tmp_path_factory.mktemp("features"), shards=2, redis_url=f"redis://127.0.0.1:{redis_process.port}/0")
    m.child("router").argv += ["--metrics-port", str(metrics_port)]
    m.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    with m:
        yield m


@pytest.fixture(scope="module")
def router(mesh):
    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for tenant in ("", "acme"):
            docs = [router_pb2.Document(source=str(p), content=p.read_bytes()) for p in sorted(SAMPLES.iterdir())]
            stub.Ingest(router_pb2.IngestRequest(documents=docs, tenant=tenant), timeout=120)
        # a document only tenant "globex" has, on a topic the samples lack
        stub.Ingest(router_pb2.IngestRequest(tenant="globex", documents=[router_pb2.Document(
            id="secret", source="globex/merger.txt", tags=["confidential"],
            text="Globex will acquire the Initech stapler factory in March for forty million dollars.")]), timeout=60)
        yield stub


def metric(mesh, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(mesh.metrics_url, timeout=5).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + wanted + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def calls(mesh) -> dict[str, float]:
    return {s: metric(mesh, "ragloom_router_downstream_calls_total", service=s) for s in ("embedder", "indexer", "generator")}


ASK = dict(question="What did Champollion achieve, and in which year?", max_tokens=24)


def test_repeated_ask_is_served_from_cache_and_skips_every_service(mesh, router):
    first = router.Ask(router_pb2.AskRequest(**ASK), timeout=120)
    assert not first.cached
    before = calls(mesh)
    second = router.Ask(router_pb2.AskRequest(**ASK), timeout=30)
    assert second.cached and second.answer == first.answer
    assert [s.chunk_id for s in second.sources] == [s.chunk_id for s in first.sources]
    assert calls(mesh) == before, "a cache hit must not embed, search or generate"


def test_ingest_invalidates_the_cached_answer(mesh, router):
    router.Ask(router_pb2.AskRequest(**ASK), timeout=120)
    assert router.Ask(router_pb2.AskRequest(**ASK), timeout=30).cached
    router.Ingest(router_pb2.IngestRequest(documents=[router_pb2.Document(id="extra", text="Porcelain was fired in kilns.")]), timeout=60)
    assert not router.Ask(router_pb2.AskRequest(**ASK), timeout=120).cached


def test_fifty_identical_concurrent_asks_cause_one_generation(mesh, router):
    question = dict(question="Which pass is the usual way up the southern side of the highest mountain?", max_tokens=24)
    before = calls(mesh)["generator"]

    async def ask_all():
        async with grpc.aio.insecure_channel(mesh.router) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            return await asyncio.gather(*(stub.Ask(router_pb2.AskRequest(**question), timeout=120) for _ in range(50)))

    answers = asyncio.run(ask_all())
    assert len({a.answer for a in answers}) == 1
    assert calls(mesh)["generator"] == before + 2  # one re-reading of the evidence (Score), one generation


def test_asks_succeed_while_redis_is_down(mesh, router, redis_process):
    redis_process.stop()
    try:
        errors = metric(mesh, "ragloom_router_cache_lookups_total", result="error")
        for i in range(3):
            reply = router.Ask(router_pb2.AskRequest(question=f"How is sourdough leavened? ({i})", max_tokens=16), timeout=120)
            assert reply.answer and not reply.cached
        assert metric(mesh, "ragloom_router_cache_lookups_total", result="error") > errors
    finally:
        redis_process.start()


def test_tenants_are_isolated_in_search_and_cache(router):
    secret_q = "Which company is buying a stapler factory, and for how much?"
    hits = router.Search(router_pb2.SearchRequest(query=secret_q, top_k=50, scope=router_pb2.Scope(tenant="acme")), timeout=30).hits
    assert hits and all("Globex" not in h.text for h in hits)
    own = router.Search(router_pb2.SearchRequest(query=secret_q, top_k=1, scope=router_pb2.Scope(tenant="globex")), timeout=30).hits
    assert own[0].document_id == "secret"
    tagged = router.Search(router_pb2.SearchRequest(
        query=secret_q, top_k=5, scope=router_pb2.Scope(tenant="acme", tags=["confidential"])), timeout=30).hits
    assert tagged == [], "a tag filter must not widen the tenant"
    # the same question cached for globex must never be served to acme
    globex = router.Ask(router_pb2.AskRequest(question=secret_q, max_tokens=24, scope=router_pb2.Scope(tenant="globex")), timeout=120)
    router.Ask(router_pb2.AskRequest(question=secret_q, max_tokens=24, scope=router_pb2.Scope(tenant="globex")), timeout=120)
    acme = router.Ask(router_pb2.AskRequest(question=secret_q, max_tokens=24, scope=router_pb2.Scope(tenant="acme")), timeout=120)
    assert not acme.cached
    assert all(s.document_id != "secret" for s in acme.sources)
    assert any(s.document_id == "secret" for s in globex.sources)


def test_dead_shard_gives_a_partial_result_within_the_deadline(mesh, router):
    shard = mesh.child("indexer-1")
    shard.process.kill()
    shard.process.wait()
    try:
        started = time.monotonic()
        reply = router.Search(router_pb2.SearchRequest(query="bees and their hives", top_k=5), timeout=10)
        assert time.monotonic() - started < 5
        assert reply.coverage.partial and list(reply.coverage.shards_failed) == [1]
        assert list(reply.coverage.shards_answered) == [0]
        with pytest.raises(grpc.RpcError) as info:
            router.Search(router_pb2.SearchRequest(query="bees", top_k=5, require_complete=True), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        mesh.restart("indexer-1", kill=False)
