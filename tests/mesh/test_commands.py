"""The client commands against a fake router: their exit status (1 when any file of an ingest failed, and
how many of how many said; else by the class of the status the router answered, EXIT_CODES), that each
request option reaches the router as the field it names, and `ragloom status`."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.cli import main
from mesh.cli import EXIT_CODES
from mesh.commands import exit_code
from ragloom.router.v1 import router_pb2, router_pb2_grpc
from tests.support.ports import free_port_block

#: What the fake router answers a query, question or document id (or document content) starting with each word.
REFUSALS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "missing": grpc.StatusCode.NOT_FOUND,
    "down": grpc.StatusCode.UNAVAILABLE,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "slow": grpc.StatusCode.DEADLINE_EXCEEDED,
    "bug": grpc.StatusCode.INTERNAL,
}


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    def __init__(self):
        #: (method, request, metadata) of every call, latest last
        self.calls: list[tuple[str, object, dict]] = []
        self.coverage = router_pb2.Coverage(shards_answered=[0, 1], retrieval=router_pb2.RETRIEVAL_MODE_HYBRID)

    def last(self, method: str):
        return next(request for name, request, _ in reversed(self.calls) if name == method)

    def _refuse(self, text: str, context, method: str = "", request=None) -> None:
        if method:
            self.calls.append((method, request, dict(context.invocation_metadata())))
        code = REFUSALS.get(text.split(" ", 1)[0])
        if code is not None:
            context.abort(code, f"refused {text!r}")

    def Ingest(self, request, context):
        for document in request.documents:
            self._refuse(document.content.decode(), context, "Ingest", request)
        return router_pb2.IngestResponse(documents=[router_pb2.IngestedDocument(id=d.id, chunks=2)
                                                    for d in request.documents])

    def Search(self, request, context):
        self._refuse(request.query, context, "Search", request)
        return router_pb2.SearchResponse(hits=[router_pb2.SearchHit(source="a.txt", text="found", score=0.5)],
                                         coverage=self.coverage)

    def Ask(self, request, context):
        self._refuse(request.question, context, "Ask", request)
        return router_pb2.AskResponse(answer="yes")

    def AskStream(self, request, context):
        self.calls.append(("AskStream", request, dict(context.invocation_metadata())))
        yield router_pb2.AskStreamResponse(token="ye")
        self._refuse(request.question, context)
        yield router_pb2.AskStreamResponse(token="s")

    def DeleteDocument(self, request, context):
        self._refuse(request.document_id, context, "DeleteDocument", request)
        return router_pb2.DeleteDocumentResponse(removed_chunks=3)


@pytest.fixture(scope="module")
def fake():
    return FakeRouter()


@pytest.fixture(scope="module")
def health_servicer():
    return health.HealthServicer()


@pytest.fixture(scope="module")
def router(fake, health_servicer):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def ragloom(router, tmp_path):
    """Runs `ragloom ARGS...` against the fake router; returns its exit status."""

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--router", router, "--token", "", "--data-dir", str(tmp_path / "data")])
        return exited.value.code

    return run


def files(folder, **contents: str) -> list[str]:
    folder.mkdir(exist_ok=True)
    for name, text in contents.items():
        (folder / f"{name}.txt").write_text(text)
    return [str(folder / f"{name}.txt") for name in contents]


def test_an_ingest_with_one_bad_file_among_good_ones_exits_1_and_says_how_many_failed(ragloom, tmp_path, capsys):
    paths = files(tmp_path / "docs", a="alpha", b="invalid bytes", c="gamma")
    assert ragloom("ingest", *paths) == 1
    out = capsys.readouterr().out
    assert "ingested 2 file(s), 4 chunks" in out and "1 of 3 failed" in out and "b.txt: INVALID_ARGUMENT" in out
    assert ragloom("ingest", *paths, "--json") == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["files"], summary["total"], summary["chunks"]) == (2, 3, 4)
    assert [f["path"] for f in summary["failed"]] == [paths[1]]


def test_an_ingest_counts_a_missing_path_as_failed_and_a_whole_one_exits_0(ragloom, tmp_path, capsys):
    paths = files(tmp_path / "docs", a="alpha", c="gamma")
    assert ragloom("ingest", *paths) == 0
    assert "0 of 2 failed" in capsys.readouterr().out
    assert ragloom("ingest", *paths, str(tmp_path / "nowhere.txt")) == 1
    assert "1 of 3 failed" in capsys.readouterr().out


def test_an_ingest_that_reaches_no_router_is_worth_retrying(tmp_path, capsys):
    paths = files(tmp_path / "docs", a="alpha")
    with pytest.raises(SystemExit) as exited:
        main(["ingest", *paths, "--router", f"127.0.0.1:{free_port_block(1)}", "--token", "",
              "--data-dir", str(tmp_path / "data"), "--timeout", "5"])
    assert exited.value.code == 3 and "is the mesh running" in capsys.readouterr().err


@pytest.mark.parametrize("word, expected", [
    ("fine", 0), ("invalid", 2), ("missing", 2), ("down", 3), ("busy", 3), ("slow", 3), ("bug", 1),
])
def test_search_ask_and_delete_exit_by_the_class_of_the_status(ragloom, capsys, word, expected):
    assert ragloom("search", f"{word} query") == expected
    assert ragloom("search", f"{word} query", "--json") == expected
    assert ragloom("ask", f"{word} question", "--json") == expected
    assert ragloom("ask", f"{word} question") == expected  # the stream fails after its first token
    assert ragloom("delete", "ok doc", f"{word} doc") == expected  # the first is removed, the second refused
    err = capsys.readouterr().err
    if expected:
        assert f"ragloom: {REFUSALS[word].name}: refused" in err


def test_the_exit_codes_cover_every_status_and_are_documented():
    assert exit_code(grpc.StatusCode.OK) == 0
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            assert exit_code(code) in (1, 2, 3)
            assert (code.name in EXIT_CODES) == (exit_code(code) in (2, 3)), code
    assert exit_code(grpc.StatusCode.UNAUTHENTICATED) == 2 and exit_code(grpc.StatusCode.ABORTED) == 3
    assert exit_code(grpc.StatusCode.UNKNOWN) == 1 and exit_code(grpc.StatusCode.CANCELLED) == 1


def test_each_search_option_reaches_the_router(ragloom, fake):
    assert ragloom("search", "fine query", "--mode", "lexical", "--tenant", "alice", "--tag", "a", "--tag", "b",
                   "--require-complete", "--rerank", "--top-k", "3") == 0
    request = fake.last("Search")
    assert request.mode == router_pb2.RETRIEVAL_MODE_LEXICAL and request.require_complete
    assert request.scope == router_pb2.Scope(tenant="alice", tags=["a", "b"])
    assert request.HasField("rerank") and request.rerank and request.top_k == 3
    assert ragloom("search", "fine query", "--no-rerank") == 0
    request = fake.last("Search")
    assert request.HasField("rerank") and not request.rerank
    assert ragloom("search", "fine query") == 0
    request = fake.last("Search")
    assert not request.HasField("rerank") and not request.HasField("top_k") and request.mode == 0
    assert request.scope == router_pb2.Scope() and not request.require_complete


@pytest.mark.parametrize("stream", [True, False])
def test_each_ask_option_reaches_the_router(ragloom, fake, stream):
    json_flag = [] if stream else ["--json"]
    assert ragloom("ask", "fine question", *json_flag, "--mode", "dense", "--tenant", "bob", "--tag", "x",
                   "--require-complete", "--no-cache", "--top-k", "4", "--max-tokens", "16",
                   "--temperature", "0") == 0
    request = fake.last("AskStream" if stream else "Ask")
    assert request.mode == router_pb2.RETRIEVAL_MODE_DENSE and request.scope == router_pb2.Scope(tenant="bob",
                                                                                                  tags=["x"])
    assert request.require_complete and request.no_cache and (request.top_k, request.max_tokens) == (4, 16)
    assert request.HasField("temperature") and request.temperature == 0.0
    assert ragloom("ask", "fine question", *json_flag) == 0
    request = fake.last("AskStream" if stream else "Ask")
    for name in ("top_k", "max_tokens", "temperature"):
        assert not request.HasField(name), name
    assert not request.no_cache and request.mode == 0


def test_ingest_and_delete_options_reach_the_router(ragloom, fake, tmp_path):
    (path,) = files(tmp_path / "docs", a="alpha")
    assert ragloom("ingest", path, "--tenant", "carol", "--tag", "t1", "--tag", "t2") == 0
    request = fake.last("Ingest")
    assert request.tenant == "carol" and list(request.documents[0].tags) == ["t1", "t2"]
    assert ragloom("delete", "ok doc", "--tenant", "carol") == 0
    assert fake.last("DeleteDocument") == router_pb2.DeleteDocumentRequest(document_id="ok doc", tenant="carol")


def test_the_token_is_sent_from_the_flag_else_the_environment(router, fake, tmp_path, monkeypatch):
    def metadata(*argv: str) -> dict:
        with pytest.raises(SystemExit) as exited:
            main(["search", "fine query", "--router", router, "--data-dir", str(tmp_path), *argv])
        assert exited.value.code == 0
        return fake.calls[-1][2]

    assert metadata("--token", "abc")["authorization"] == "Bearer abc"
    monkeypatch.setenv("RAGLOOM_TOKEN", "from-env")
    assert metadata()["authorization"] == "Bearer from-env"
    assert "authorization" not in metadata("--token", "")


def test_status_reports_health_and_the_shards_coverage(ragloom, fake, health_servicer, capsys):
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert ragloom("status") == 0
    out = capsys.readouterr().out
    assert "health     SERVING" in out and "2 answered (0, 1); 0 failed" in out and "hybrid" in out
    assert "not seen" in out and "cache" in out
    fake.coverage = router_pb2.Coverage(partial=True, shards_answered=[0], shards_failed=[1],
                                        degraded=["retrieval: embedder unavailable, lexical (BM25) only"])
    try:
        assert ragloom("status", "--json") == 1
        report = json.loads(capsys.readouterr().out)
        assert report["search"]["shards_failed"] == [1] and report["search"]["partial"]
        assert "embedder unavailable" in report["search"]["degraded"][0]
        assert fake.last("Search").top_k == 1
    finally:
        fake.coverage = router_pb2.Coverage(shards_answered=[0, 1], retrieval=router_pb2.RETRIEVAL_MODE_HYBRID)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert ragloom("status") == 1 and "NOT_SERVING" in capsys.readouterr().out
    finally:
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)


def test_status_of_an_endpoint_without_health_or_router(tmp_path, capsys):
    server = grpc.server(futures.ThreadPoolExecutor(2))  # a RouterService without grpc.health (as behind a gateway)
    router_pb2_grpc.add_RouterServiceServicer_to_server(FakeRouter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(SystemExit) as exited:
            main(["status", "--router", f"127.0.0.1:{port}", "--token", "", "--data-dir", str(tmp_path)])
        assert exited.value.code == 0 and "not exposed" in capsys.readouterr().out
    finally:
        server.stop(0)
    with pytest.raises(SystemExit) as exited:
        main(["status", "--router", f"127.0.0.1:{free_port_block(1)}", "--token", "", "--data-dir", str(tmp_path),
              "--timeout", "5"])
    assert exited.value.code == 3 and "is the mesh running" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_has_gone_ends_quietly(router, tmp_path):
    """`ragloom search … | head`, head done first: no BrokenPipeError traceback, the shell's SIGPIPE status."""
    import subprocess
    import sys

    command = (f"{sys.executable} -m mesh search bees --router {router} --token '' --data-dir {tmp_path} --json; "
               "echo \"exit $?\" >&2")
    # `true` has exited long before Python has started, so the search's first write finds the pipe closed.
    done = subprocess.run(["bash", "-c", f"{{ {command}; }} | true"], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert "exit 141" in done.stderr, done.stderr
