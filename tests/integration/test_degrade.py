"""Partial failure through the whole mesh: the embedder down leaves hybrid search to BM25 (marked) and asks
still answered; the generator dying mid-stream ends a REST stream with an error a client can see."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import grpc
import pytest

from ragloom.router.v1 import router_pb2, router_pb2_grpc
from tests.support.mesh import LocalMesh

pytestmark = pytest.mark.integration

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "router" / "samples").iterdir())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with LocalMesh(tmp_path_factory.mktemp("degrade"), shards=2, gateway=True) as m:
        with grpc.insecure_channel(m.router) as channel:
            docs = [router_pb2.Document(source=p.name, content=p.read_bytes()) for p in SAMPLES]
            router_pb2_grpc.RouterServiceStub(channel).Ingest(router_pb2.IngestRequest(documents=docs), timeout=120)
        yield m


def test_with_the_embedder_down_hybrid_search_answers_from_bm25_and_says_so(mesh):
    embedder = mesh.child("embedder").process
    embedder.kill()
    embedder.wait()
    try:
        with grpc.insecure_channel(mesh.router) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            reply = stub.Search(router_pb2.SearchRequest(query="wild yeast in a sourdough starter", top_k=3), timeout=30)
            assert reply.hits and reply.hits[0].source == "sourdough.md"
            assert reply.coverage.retrieval == router_pb2.RETRIEVAL_MODE_LEXICAL
            assert "embedder" in reply.coverage.degraded[0] and "BM25" in reply.coverage.degraded[0]
            with pytest.raises(grpc.RpcError) as info:  # dense alone has nothing to fall back on
                stub.Search(router_pb2.SearchRequest(query="yeast", mode=router_pb2.RETRIEVAL_MODE_DENSE), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.details().startswith("embedder")
            answer = stub.Ask(router_pb2.AskRequest(question="What leavens a sourdough starter?", max_tokens=48),
                              timeout=120)
        assert answer.answer and not answer.abstained
        assert answer.coverage.retrieval == router_pb2.RETRIEVAL_MODE_LEXICAL
        stages = " | ".join(answer.degraded)
        assert "retrieval:" in stages and "rerank:" in stages, stages
    finally:
        mesh.restart("embedder", kill=False)


def test_the_generator_dying_mid_stream_ends_the_rest_stream_with_an_error(mesh):
    host, port = mesh.router.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps({"question": "Describe how a lighthouse keeper looked after the lamp, in detail.",
                       "max_tokens": 200, "no_cache": True})
    connection.request("POST", "/v1/ask:stream", body, {"content-type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200  # the stream began: its status was sent before the failure
    received = b""
    while b'"sources"' not in received:
        chunk = reply.read1(65536)
        assert chunk, "the stream ended before its sources"
        received += chunk
    generator = mesh.child("generator").process
    generator.kill()
    generator.wait()
    try:
        try:
            received += reply.read()
        except http.client.IncompleteRead as cut:  # an aborted body is an error a client sees too
            received += cut.partial
            pytest.fail(f"the body was cut instead of ending with an error event: {received[-200:]!r}")
        events = json.loads(received)
        assert "sources" in events[0]
        assert "done" not in events[-1], "a failed answer must not look finished"
        error = events[-1]["error"]
        assert error["code"] == grpc.StatusCode.UNAVAILABLE.value[0] and error["message"].startswith("generator")
    finally:
        connection.close()
        mesh.restart("generator", kill=False)
