"""ragloom.client against an in-process fake router: typed results and events, typed errors with their
details, retries only for UNAVAILABLE (and only of methods the protos call idempotent), deadlines, ingest
batching, TLS and mutual TLS, the asyncio client, and that the client imports nothing of the server side."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ragloom import client as rc
from ragloom.router.v1 import router_pb2, router_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def rich_status(code: int, message: str, *details) -> grpc.Status:
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


BAD_TOP_K = rich_status(code_pb2.INVALID_ARGUMENT, "top_k: must be between 1 and 1000, got 0",
                        error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(
                            field="top_k", description="must be between 1 and 1000, got 0")]))
BUSY = rich_status(code_pb2.RESOURCE_EXHAUSTED, "too many searches in flight",
                   error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)))


class Fake(router_pb2_grpc.RouterServiceServicer):
    """Records each request and its metadata; the query or question picks the behaviour."""

    def __init__(self):
        self.requests: list[tuple[str, object, dict]] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()

    def _seen(self, method: str, request, context) -> int:
        with self.lock:
            self.requests.append((method, request, dict(context.invocation_metadata())))
            key = f"{method}:{getattr(request, 'query', '') or getattr(request, 'question', '')}"
            self.attempts[key] = self.attempts.get(key, 0) + 1
            return self.attempts[key]

    def Search(self, request, context):
        attempt = self._seen("Search", request, context)
        if request.query == "flaky" and attempt <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if request.query == "down":
            context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        if request.query == "busy":
            context.abort_with_status(BUSY)
        if request.query == "slow":
            time.sleep(1.0)
        if request.HasField("top_k") and request.top_k == 0:
            context.abort_with_status(BAD_TOP_K)
        if request.query == "teapot":
            context.abort(grpc.StatusCode.DATA_LOSS, "odd")
        return router_pb2.SearchResponse(
            hits=[router_pb2.SearchHit(score=0.9, document_id="d", chunk_id="d#0", source="d.txt",
                                       text="Bees dance. They point.", shard_id=1,
                                       evidence=[router_pb2.Span(start=12, end=23, score=0.7)])],
            timings=router_pb2.Timings(total_ms=4.5),
            coverage=router_pb2.Coverage(partial=True, shards_answered=[1], shards_failed=[0],
                                         retrieval=router_pb2.RETRIEVAL_MODE_LEXICAL, degraded=["retrieval: x"]))

    def _sources(self):
        return router_pb2.AskSources(sources=[router_pb2.Source(number=1, document_id="d", source="d.txt", text="t"),
                                              router_pb2.Source(number=2, document_id="e", source="e.txt")],
                                     coverage=router_pb2.Coverage(shards_answered=[0, 1]), cached=True)

    def Ask(self, request, context):
        self._seen("Ask", request, context)
        s = self._sources()
        return router_pb2.AskResponse(answer="Bees dance [2].", sources=s.sources, citations=[2], cached=True,
                                      coverage=s.coverage, completion_tokens=5,
                                      support=[router_pb2.Support(source=2, span=router_pb2.Span(end=3), text="abc")])

    def AskStream(self, request, context):
        self._seen("AskStream", request, context)
        yield router_pb2.AskStreamResponse(sources=self._sources())
        yield router_pb2.AskStreamResponse(token="Bees dance. ")
        if request.question == "breaks":
            yield router_pb2.AskStreamResponse(error=status_pb2.Status(code=code_pb2.UNAVAILABLE,
                                                                       message="generator: gone"))
            context.abort(grpc.StatusCode.UNAVAILABLE, "generator: gone")
        if request.question == "aborts":
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        if request.question == "long":
            for _ in range(100):
                time.sleep(0.05)
                yield router_pb2.AskStreamResponse(token="more. ")
        yield router_pb2.AskStreamResponse(done=router_pb2.AskDone(citations=[1], completion_tokens=3,
                                                                   timings=router_pb2.Timings(total_ms=9)))

    def Ingest(self, request, context):
        self._seen("Ingest", request, context)
        batch = sum(1 for method, *_ in self.requests if method == "Ingest")
        if any(d.text == "unparseable" for d in request.documents):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "documents[0]: no text found in the document")
        return router_pb2.IngestResponse(
            documents=[router_pb2.IngestedDocument(id=d.id or f"hash-{i}", chunks=2, shard_id=i % 2)
                       for i, d in enumerate(request.documents)],
            sequences={0: 10 * batch, 1: 100 - batch})

    def DeleteDocument(self, request, context):
        self._seen("DeleteDocument", request, context)
        if request.document_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such document")
        return router_pb2.DeleteDocumentResponse(removed_chunks=3, sequences={1: 7})


def start(fake, credentials=None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(8))
    router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
    port = server.add_secure_port("127.0.0.1:0", credentials) if credentials else \
        server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def fake():
    return Fake()


@pytest.fixture
def address(fake):
    server, address = start(fake)
    yield address
    server.stop(0)


@pytest.fixture
def rag(address):
    with rc.Client(address, token="tok", timeout=10) as client:
        yield client


def test_search_returns_typed_hits_with_coverage_and_sends_every_option(rag, fake):
    result = rag.search("bees", top_k=3, tenant="alice", tags=["a", "b"], mode="lexical", require_complete=True,
                        rerank=True, min_sequences={0: 4})
    (hit,) = result
    assert len(result) == 1 and result[0] is hit and isinstance(hit, rc.Hit)
    assert (hit.document_id, hit.shard_id, hit.evidence_text) == ("d", 1, ["They point."])
    assert result.coverage == rc.Coverage(True, (1,), (0,), "lexical", ("retrieval: x",))
    assert result.timings.total_ms == 4.5
    method, request, metadata = fake.requests[-1]
    assert metadata["authorization"] == "Bearer tok"
    assert request == router_pb2.SearchRequest(
        query="bees", top_k=3, scope=router_pb2.Scope(tenant="alice", tags=["a", "b"]),
        mode=router_pb2.RETRIEVAL_MODE_LEXICAL, require_complete=True, rerank=True, min_sequences={0: 4})
    rag.search("bees")
    bare = fake.requests[-1][1]
    assert not bare.HasField("top_k") and not bare.HasField("rerank") and bare.mode == 0, "unset means the router's"


def test_ask_and_its_options(rag, fake):
    answer = rag.ask("why?", top_k=4, max_tokens=32, temperature=0.0, tenant="t", tags=["x"], mode="dense",
                     require_complete=True, no_cache=True)
    assert answer.text == "Bees dance [2]." and answer.citations == (2,) and answer.cached
    assert [s.source for s in answer.cited] == ["e.txt"] and answer.support[0].span == rc.Span(0, 3)
    request = fake.requests[-1][1]
    assert request.HasField("temperature") and request.temperature == 0.0, "0 (greedy) is sent, not dropped"
    assert (request.top_k, request.max_tokens, request.no_cache, request.mode) == (4, 32, True, 1)
    with pytest.raises(TypeError):
        rag.ask("why?", rerank=True)  # not an option of Ask
    with pytest.raises(rc.InvalidArgument) as info:
        rag.ask("why?", mode="semantic")
    assert info.value.field == "mode" and isinstance(info.value, ValueError)


def test_ask_stream_yields_typed_events_and_an_error_event_raises(rag):
    events = list(rag.ask_stream("why?"))
    assert [type(e) for e in events] == [rc.Sources, rc.Token, rc.Done]
    assert events[0].cached and events[0].sources[1].number == 2 and events[1].text == "Bees dance. "
    assert events[2].citations == (1,) and events[2].timings.total_ms == 9
    seen = []
    with pytest.raises(rc.Unavailable) as info:
        for event in rag.ask_stream("breaks"):
            seen.append(event)
    assert info.value.message == "generator: gone" and [type(e) for e in seen] == [rc.Sources, rc.Token]
    with pytest.raises(rc.Internal):
        list(rag.ask_stream("aborts"))


def test_leaving_a_stream_early_cancels_it(rag):
    started = time.perf_counter()
    for event in rag.ask_stream("long"):
        if isinstance(event, rc.Token):
            break
    assert time.perf_counter() - started < 2


def test_errors_are_typed_with_the_status_details(rag, fake):
    with pytest.raises(rc.InvalidArgument) as info:
        rag.search("bees", top_k=0)
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "top_k"
    assert error.field_violations == [("top_k", "must be between 1 and 1000, got 0")]
    assert str(error) == "INVALID_ARGUMENT: top_k: must be between 1 and 1000, got 0"
    with pytest.raises(rc.ResourceExhausted) as info:
        rag.search("busy")
    assert info.value.retry_after == 2.5
    assert fake.attempts["Search:busy"] == 1, "RESOURCE_EXHAUSTED is never retried"
    with pytest.raises(rc.NotFound):
        rag.delete("missing")
    with pytest.raises(rc.RagloomError) as info:
        rag.search("teapot")
    assert type(info.value) is rc.RagloomError and info.value.code == grpc.StatusCode.DATA_LOSS


def test_unavailable_is_retried_a_bounded_number_of_times(address, fake):
    with rc.Client(address, timeout=10) as rag:
        assert len(rag.search("flaky")) == 1
        assert fake.attempts["Search:flaky"] == 3
        with pytest.raises(rc.Unavailable):
            rag.search("down")
        assert fake.attempts["Search:down"] == 4, "1 call + 3 retries"
    with rc.Client(address, timeout=10, retries=0) as rag:
        with pytest.raises(rc.Unavailable):
            rag.search("down")
        assert fake.attempts["Search:down"] == 5


def test_only_methods_the_protos_call_idempotent_are_retried():
    """A method without NO_SIDE_EFFECTS or IDEMPOTENT gets no retry policy: a repeat might apply it twice."""
    proto = descriptor_pb2.FileDescriptorProto(name="probe.proto", package="probe")
    proto.message_type.add(name="M")
    service = proto.service.add(name="S")
    service.method.add(name="Read", input_type=".probe.M", output_type=".probe.M").options.idempotency_level = \
        descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    service.method.add(name="Write", input_type=".probe.M", output_type=".probe.M")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    config = rc.retry_service_config(pool.FindServiceByName("probe.S"), retries=2)
    assert '"method": "Read"' in config and "Write" not in config and '"maxAttempts": 3' in config
    assert "RESOURCE_EXHAUSTED" not in config and '"UNAVAILABLE"' in config
    router = rc.retry_service_config()
    assert all(f'"method": "{m.name}"' in router for m in rc.SERVICE.methods)
    with pytest.raises(ValueError):
        rc.retry_service_config(retries=5)


def test_a_deadline_that_expires_raises_deadline_exceeded(rag):
    started = time.perf_counter()
    with pytest.raises(rc.DeadlineExceeded):
        rag.search("slow", timeout=0.2)
    assert time.perf_counter() - started < 0.9
    with pytest.raises(ValueError):
        rc.Client("127.0.0.1:1", timeout=0)


def test_ingest_batches_texts_bytes_paths_and_documents(rag, fake, tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Notes\nBees dance.")
    seen = []
    result = rag.ingest(["plain text", b"raw bytes", path, rc.Document(text="t", id="mine", tags=("own",))],
                        tenant="alice", tags=["batch"], metadata={"by": "test"}, batch_size=3,
                        progress=lambda done, total: seen.append((done, total)))
    batches = [r for m, r, _ in fake.requests if m == "Ingest"]
    assert [len(b.documents) for b in batches] == [3, 1] and all(b.tenant == "alice" for b in batches)
    text, raw, file, own = [d for b in batches for d in b.documents]
    assert text.text == "plain text" and raw.content == b"raw bytes"
    assert file.id == str(path.resolve()) == file.source and file.content == path.read_bytes()
    assert own.id == "mine" and list(own.tags) == ["own", "batch"] and own.metadata["by"] == "test"
    assert seen == [(3, 4), (4, 4)]
    assert [d.id for d in result.documents] == ["hash-0", "hash-1", str(path.resolve()), "mine"]
    assert result.chunks == 8
    assert result.sequences == {0: 20, 1: 99}, "per shard, the latest write's sequence"
    rag.ingest("one text")
    assert fake.requests[-1][1].documents[0].text == "one text", "a single str is one document, not characters"
    with pytest.raises(rc.InvalidArgument):
        rag.ingest(["fine", "unparseable"])
    assert rag.delete("d", tenant="alice") == rc.DeleteResult(3, {1: 7})
    assert fake.requests[-1][1] == router_pb2.DeleteDocumentRequest(document_id="d", tenant="alice")


def test_ingest_splits_batches_by_bytes_too(rag, fake):
    rag.ingest(["a" * 600, "b" * 600, "c" * 10], batch_size=10, batch_bytes=1000)
    assert [len(r.documents) for m, r, _ in fake.requests if m == "Ingest"] == [1, 2]


def test_tls_and_mutual_tls(fake, tmp_path):
    from fabric.tls import LocalCA, spiffe_id  # the test's CA; the client itself never imports fabric

    ca = LocalCA(tmp_path / "pki")
    server_id = ca.issue("router", spiffe_id("router"), hosts=("router.example",))
    client_id = ca.issue("me", spiffe_id("me"))
    key, cert = server_id.key.read_bytes(), server_id.cert.read_bytes()
    server, address = start(fake, grpc.ssl_server_credentials([(key, cert)]))
    try:
        with rc.Client(address, tls=ca.cert_path, server_name="router.example", timeout=10) as rag:
            assert len(rag.search("bees")) == 1
        with rc.Client(address, timeout=5, retries=0) as plain:
            with pytest.raises(rc.Unavailable):
                plain.search("bees")
    finally:
        server.stop(0)
    mutual = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca.cert_path.read_bytes(),
                                         require_client_auth=True)
    server, address = start(fake, mutual)
    try:
        with rc.Client(address, tls=ca.cert_path.read_bytes(), cert=client_id.cert, key=client_id.key,
                       server_name="router.example", timeout=10) as rag:
            assert len(rag.search("bees")) == 1
        with rc.Client(address, tls=ca.cert_path, server_name="router.example", timeout=5, retries=0) as rag:
            with pytest.raises(rc.Unavailable):
                rag.search("bees")  # no client certificate: the handshake fails
    finally:
        server.stop(0)
    with pytest.raises(ValueError):
        rc.Client(address, cert=client_id.cert, key=client_id.key)  # a certificate without TLS


async def test_the_async_client(address, fake):
    async with rc.AsyncClient(address, token="tok", timeout=10) as rag:
        assert (await rag.search("bees", mode="hybrid"))[0].document_id == "d"
        assert (await rag.ask("why?")).citations == (2,)
        events = [e async for e in rag.ask_stream("why?")]
        assert [type(e) for e in events] == [rc.Sources, rc.Token, rc.Done]
        with pytest.raises(rc.Unavailable):
            async for _ in rag.ask_stream("breaks"):
                pass
        result = await rag.ingest(["a", "b", "c"], batch_size=2)
        assert len(result.documents) == 3
        assert (await rag.delete("d")).removed_chunks == 3
        with pytest.raises(rc.DeadlineExceeded):
            await rag.search("slow", timeout=0.2)
        with pytest.raises(rc.InvalidArgument) as info:
            await rag.search("bees", top_k=0)
        assert info.value.field == "top_k"
    assert fake.requests[0][2]["authorization"] == "Bearer tok"


def test_the_client_imports_nothing_of_the_server_side():
    code = ("import sys, ragloom.client; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fabric', 'mesh', 'router', 'embedder', 'indexer', 'generator')); print(bad)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
