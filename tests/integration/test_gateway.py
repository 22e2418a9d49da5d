"""The local plane: a real Envoy in front of the router with the chart's traffic policy, and mTLS everywhere."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from mesh import policy
from fabric.tls import LocalCA
from tests.support.gateway import start_gateway
from tests.support.mesh import LocalMesh
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from ragloom.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "router" / "samples"


def post(url: str, body: dict, method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, _json(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, _json(error.read())


def _json(body: bytes) -> dict:
    try:
        return json.loads(body or b"{}")
    except ValueError:
        return {"text": body.decode(errors="replace")}


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


def test_rest_edges_unknown_paths_methods_and_empty_ids(mesh):
    base = f"http://{mesh.router}"
    status, body = post(f"{base}/v1/documents/", None, method="DELETE")
    assert status == 400 and body["message"] == "document_id: must not be empty"
    status, body = post(f"{base}/v1/nothing", {"query": "x"})
    assert status == 404 and "/v1/search" in body["message"]
    status, body = post(f"{base}/v1/search", None, method="GET")
    assert status == 405 and "POST" in body["message"]
    status, body = post(f"{base}/v1/documents/some-id", {}, method="PUT")
    assert status == 405 and "DELETE" in body["message"]


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


def test_gateway_metrics_are_served_and_its_admin_is_not(mesh):
    stats = urllib.request.urlopen(mesh.plan.gateway_metrics, timeout=5).read().decode()
    assert "envoy_cluster_upstream_rq" in stats and "router-stable" in stats
    socket = mesh.child("gateway").ready_socket
    assert socket.stat().st_mode & 0o777 == 0o600, "the admin socket is its owner's only"
    metrics = mesh.plan.gateway_metrics.rsplit("/", 2)[0]
    for base in (f"http://{mesh.router}", metrics):  # every TCP port the gateway listens on
        for method, path in (("POST", "/quitquitquit"), ("GET", "/config_dump"), ("POST", "/healthcheck/fail")):
            status, _ = post(base + path, None, method=method)
            assert status in (401, 404, 405), (base, path, status)
    status, _ = post(mesh.plan.gateway_metrics, None, method="POST")
    assert status == 405
    assert mesh.child("gateway").process.poll() is None, "the gateway is still running"


@pytest.fixture
def envoy_in_front(tmp_path):
    """Starts fake stable/canary routers and an Envoy configured from the chart's canary values."""
    started = []

    def start(weight: int, fail_first_attempt: bool = False):
        gateway = start_gateway(tmp_path / f"gw{len(started)}", values=(CANARY_VALUES,), weight=weight, canary=True,
                                fail_first_attempt=fail_first_attempt)
        started.append(gateway)
        assert gateway.traffic.route("router").canary
        return gateway.address, gateway.traffic, gateway.fakes

    yield start
    for gateway in started:
        gateway.stop()


CANARY_VALUES = Path(policy.__file__).parent / "chart" / "values-canary.yaml"


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
    return policy.load(CANARY_VALUES).route("router").canary_weight


def test_envoy_retries_reads_and_idempotent_writes_by_the_protos(envoy_in_front):
    address, traffic, fakes = envoy_in_front(weight=0, fail_first_attempt=True)
    route = traffic.route("router")
    assert route.retries_for("Search") is route.retries and "unavailable" in route.retries.retry_on
    assert route.retries_for("Ingest") is route.idempotent_retries
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        reply = stub.Search(router_pb2.SearchRequest(query="once"), timeout=10)
        ingested = stub.Ingest(router_pb2.IngestRequest(documents=[router_pb2.Document(id="doc", text="t")]), timeout=10)
    assert reply.hits[0].source == "stable"
    assert fakes["stable"].seen["once"] == 2, "the client saw success because Envoy retried"
    assert [d.id for d in ingested.documents] == ["doc"]
    assert fakes["stable"].seen["ingest:doc"] == 2, "Ingest is IDEMPOTENT: retried once after UNAVAILABLE"
