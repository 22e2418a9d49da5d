"""The local plane: a real Envoy in front of the router with the chart's traffic policy, and mTLS everywhere."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from mesh import policy
from mesh.gateway import Upstream, envoy_argv, envoy_config, write_config
from tests.support.mesh import LocalMesh
from tests.support.ports import free_port_block
from mesh.launcher import Child, start_child, wait_ready, stop_all
from fabric.tls import LocalCA
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from ragloom.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "router" / "samples"


def post(url: str, body: dict, method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with LocalMesh(tmp_path_factory.mktemp("gateway"), shards=2, gateway=True, mtls=True) as m:
        with grpc.insecure_channel(m.router) as channel:
            docs = [router_pb2.Document(source=str(p), content=p.read_bytes()) for p in sorted(SAMPLES.iterdir())]
            router_pb2_grpc.RouterServiceStub(channel).Ingest(router_pb2.IngestRequest(documents=docs), timeout=120)
        yield m


def test_rest_search_and_ask_return_what_grpc_returns(mesh):
    base = f"http://{mesh.router}"
    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        grpc_hits = stub.Search(router_pb2.SearchRequest(query="who decoded the hieroglyphs", top_k=3), timeout=30).hits
        grpc_answer = stub.Ask(router_pb2.AskRequest(question="Who decoded the hieroglyphs?", max_tokens=24), timeout=120)
    status, body = post(f"{base}/v1/search", {"query": "who decoded the hieroglyphs", "top_k": 3})
    assert status == 200, body
    assert [h["chunk_id"] for h in body["hits"]] == [h.chunk_id for h in grpc_hits]
    assert [round(h["score"], 4) for h in body["hits"]] == [round(h.score, 4) for h in grpc_hits]
    status, body = post(f"{base}/v1/ask", {"question": "Who decoded the hieroglyphs?", "max_tokens": 24})
    assert status == 200, body
    assert body["answer"] == grpc_answer.answer
    assert [s["chunk_id"] for s in body["sources"]] == [s.chunk_id for s in grpc_answer.sources]


def test_rest_errors_are_http_statuses_with_the_grpc_message(mesh):
    status, body = post(f"http://{mesh.router}/v1/search", {"query": "", "top_k": 3})
    assert status == 400
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert body["message"].startswith("query")
    status, body = post(f"http://{mesh.router}/v1/documents/not-there", None, method="DELETE")
    assert status == 200 and body.get("removed_chunks", 0) == 0


def test_plaintext_and_wrong_identity_are_refused(mesh):
    router_direct = mesh.child("router").address
    with grpc.insecure_channel(router_direct) as channel:
        with pytest.raises(grpc.RpcError) as info:
            router_pb2_grpc.RouterServiceStub(channel).Search(router_pb2.SearchRequest(query="bees"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    traffic = policy.load()
    imposter = LocalCA(mesh.spec.data_dir / "pki").issue("imposter", traffic.spiffe_id("generator"))
    credentials = imposter.channel_credentials()
    with grpc.secure_channel(mesh.child("indexer-0").address, credentials) as channel:
        with pytest.raises(grpc.RpcError) as info:
            indexer_pb2_grpc.IndexerServiceStub(channel).Stats(indexer_pb2.StatsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    router_id = LocalCA(mesh.spec.data_dir / "pki").issue("router-again", traffic.spiffe_id("router"))
    with grpc.secure_channel(mesh.child("indexer-0").address, router_id.channel_credentials()) as channel:
        assert indexer_pb2_grpc.IndexerServiceStub(channel).Stats(indexer_pb2.StatsRequest(), timeout=5).live_chunks > 0


def test_envoy_admin_stats_are_reachable(mesh):
    admin = mesh.child("gateway").ready_url.rsplit("/", 1)[0]
    stats = urllib.request.urlopen(f"{admin}/stats/prometheus", timeout=5).read().decode()
    assert "envoy_cluster_upstream_rq" in stats and "router-stable" in stats


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """Answers Search with its own name; can fail each call's first attempt with UNAVAILABLE."""

    def __init__(self, name: str, fail_first_attempt: bool = False):
        self.name, self.fail_first_attempt, self.seen = name, fail_first_attempt, {}

    def Search(self, request, context):
        attempts = self.seen[request.query] = self.seen.get(request.query, 0) + 1
        if self.fail_first_attempt and attempts == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return router_pb2.SearchResponse(hits=[router_pb2.SearchHit(source=self.name)])


@pytest.fixture
def envoy_in_front(tmp_path):
    """Starts fake stable/canary routers and an Envoy configured from the chart's canary values."""
    servers, children = [], []

    def start(weight: int, fail_first_attempt: bool = False):
        ports = free_port_block(4)
        upstreams = {}
        for offset, name in enumerate(("stable", "canary")):
            server = grpc.server(futures.ThreadPoolExecutor(8))
            fake = FakeRouter(name, fail_first_attempt)
            router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
            server.add_insecure_port(f"127.0.0.1:{ports + offset}")
            server.start()
            servers.append(server)
            upstreams[name] = (fake, Upstream(name, "127.0.0.1", ports + offset))
        traffic = policy.load(Path(policy.__file__).parent / "chart" / "values-canary.yaml")
        assert traffic.route("router").canary
        config = envoy_config(traffic, listen_host="127.0.0.1", listen_port=ports + 2, admin_port=ports + 3,
                              stable=upstreams["stable"][1], canary=upstreams["canary"][1], canary_weight=weight)
        path = write_config(config, tmp_path / "envoy.json")
        child = Child("gateway", f"127.0.0.1:{ports + 2}", envoy_argv(path, base_id=ports + 3), tmp_path / "envoy.log",
                      ready_url=f"http://127.0.0.1:{ports + 3}/ready")
        start_child(child)
        children.append(child)
        import asyncio

        asyncio.run(wait_ready([child], 30, quiet=True))
        return child.address, traffic, {name: fake for name, (fake, _) in upstreams.items()}

    yield start
    stop_all(children)
    for server in servers:
        server.stop(0)


def test_canary_split_and_header_override(envoy_in_front):
    address, traffic, _ = envoy_in_front(weight=traffic_weight())
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        landed = [stub.Search(router_pb2.SearchRequest(query=f"q{i}"), timeout=5).hits[0].source for i in range(1000)]
        forced = [stub.Search(router_pb2.SearchRequest(query=f"h{i}"), timeout=5,
                              metadata=[(traffic.canary_header, traffic.canary_header_value)]).hits[0].source
                  for i in range(100)]
    stable_share = landed.count("stable") / len(landed)
    assert abs(stable_share - (100 - traffic_weight()) / 100) <= 0.03, stable_share
    assert set(forced) == {"canary"}


def traffic_weight() -> int:
    return policy.load(Path(policy.__file__).parent / "chart" / "values-canary.yaml").route("router").canary_weight


def test_envoy_retries_a_router_that_fails_its_first_attempt(envoy_in_front):
    address, traffic, fakes = envoy_in_front(weight=0, fail_first_attempt=True)
    assert "unavailable" in traffic.route("router").retries.retry_on
    with grpc.insecure_channel(address) as channel:
        reply = router_pb2_grpc.RouterServiceStub(channel).Search(router_pb2.SearchRequest(query="once"), timeout=10)
    assert reply.hits[0].source == "stable"
    assert fakes["stable"].seen["once"] == 2, "the client saw success because Envoy retried"
