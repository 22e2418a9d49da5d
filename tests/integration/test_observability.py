"""One ask is one trace across every service; every service's /metrics moves with traffic."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from tests.support.mesh import LocalMesh
from tests.support.ports import free_port_block
from tests.support.spans import SpanSink
from ragloom.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "router" / "samples"


@pytest.fixture(scope="module")
def collector():
    with SpanSink(free_port_block(1)) as sink:
        yield sink


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, collector):
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # children inherit it: export spans every 100 ms
    os.environ["RAGLOOM_TRACE_SAMPLE_RATIO"] = "1"  # every question traced
    try:
        with LocalMesh(tmp_path_factory.mktemp("observed"), shards=2, metrics=True, otlp_endpoint=collector.endpoint) as m:
            with grpc.insecure_channel(m.router) as channel:
                docs = [router_pb2.Document(source=str(p), content=p.read_bytes()) for p in sorted(SAMPLES.iterdir())]
                router_pb2_grpc.RouterServiceStub(channel).Ingest(router_pb2.IngestRequest(documents=docs), timeout=120)
            yield m
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"], os.environ["RAGLOOM_TRACE_SAMPLE_RATIO"]


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_one_ask_is_one_trace_across_every_service(mesh, collector):
    with grpc.insecure_channel(mesh.router) as channel:
        reply = router_pb2_grpc.RouterServiceStub(channel).Ask(
            router_pb2.AskRequest(question="What made the Rosetta Stone the key to hieroglyphs?", max_tokens=16,
                                  no_cache=True), timeout=120)
    assert reply.answer
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        asks = [s for svc, s in collector.spans if svc == "ragloom-router" and s.name.endswith("RouterService/Ask")
                and s.kind == s.SPAN_KIND_SERVER]
        if asks:
            trace_id = asks[-1].trace_id
            spans = [(svc, s) for svc, s in collector.spans if s.trace_id == trace_id]
            services = {svc for svc, _ in spans}
            if {"ragloom-router", "ragloom-embedder", "ragloom-indexer", "ragloom-generator"} <= services and \
                    sum(1 for svc, s in spans if svc == "ragloom-indexer" and s.kind == s.SPAN_KIND_SERVER) >= 4:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"no complete trace; services seen: {sorted({svc for svc, _ in collector.spans})}")

    by_id = {s.span_id: (svc, s) for svc, s in spans}
    root = asks[-1]
    assert not root.parent_span_id or root.parent_span_id not in by_id, "the router's server span is the root"
    names = {s.name for _, s in spans}
    assert {"embed query", "rerank", "reread", "build prompt", "generate"} <= names
    shard_spans = [s for _, s in spans if s.name == "search shard"]
    searched = {(next(a.value.int_value for a in s.attributes if a.key == "ragloom.shard"),
                 next(a.value.string_value for a in s.attributes if a.key == "ragloom.retrieval")) for s in shard_spans}
    assert searched == {(0, "dense"), (1, "dense"), (0, "lexical"), (1, "lexical")}  # hybrid: both, on every shard
    reread = next(s for _, s in spans if s.name == "reread")  # with the lift the abstention gate judged
    assert any(a.key == "ragloom.lift" and a.value.double_value > 0 for a in reread.attributes)
    generate = next(s for _, s in spans if s.name == "generate")
    assert any(a.key == "ragloom.time_to_first_token_ms" and a.value.double_value > 0 for a in generate.attributes)

    def ancestors(span):
        chain = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id][1]
            chain.append(span)
        return chain

    for svc, span in spans:  # every span hangs off the router's Ask through correct parent links
        if span is not root:
            assert root in ancestors(span), (svc, span.name)
    indexer_servers = [s for svc, s in spans if svc == "ragloom-indexer" and s.kind == s.SPAN_KIND_SERVER]
    for server_span in indexer_servers:
        assert any(a.name == "search shard" for a in ancestors(server_span))
    generator_servers = [s for svc, s in spans if svc == "ragloom-generator" and s.kind == s.SPAN_KIND_SERVER]
    # Two calls to the generator, each under the router's span for it: the re-reading (Score), the generation.
    under = [next(a.name for a in ancestors(s) if a.name in ("generate", "reread")) for s in generator_servers]
    assert sorted(under) == ["generate", "reread"]


def test_every_service_exposes_metrics_that_move_with_traffic(mesh):
    ports = {c.name: c.metrics_port for c in mesh.children if c.metrics_port}
    assert set(ports) == {"embedder", "generator", "indexer-0", "indexer-1", "router"}
    before = {name: scrape(port) for name, port in ports.items()}
    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        stub.Ask(router_pb2.AskRequest(question="How long does sourdough rise?", max_tokens=8, no_cache=True), timeout=120)
        with pytest.raises(grpc.RpcError):
            stub.Search(router_pb2.SearchRequest(query=""), timeout=10)
    after = {name: scrape(port) for name, port in ports.items()}
    handled = "ragloom_grpc_server_handled_total"
    for name in ports:
        assert value(after[name], handled, code="OK") > value(before[name], handled, code="OK"), name
        assert "ragloom_grpc_server_handling_seconds_bucket" in after[name]
        assert "ragloom_grpc_server_in_flight" in after[name]
    router_after, router_before = after["router"], before["router"]
    assert value(router_after, handled, method="Search", code="INVALID_ARGUMENT") == \
        value(router_before, handled, method="Search", code="INVALID_ARGUMENT") + 1
    for stage in ("embedding", "retrieval", "generation"):
        assert value(router_after, "ragloom_router_stage_seconds_count", stage=stage) > \
            value(router_before, "ragloom_router_stage_seconds_count", stage=stage)
    assert value(router_after, "ragloom_router_time_to_first_token_seconds_count") > \
        value(router_before, "ragloom_router_time_to_first_token_seconds_count")
