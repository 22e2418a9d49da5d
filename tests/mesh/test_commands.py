"""The client commands' exit status, against a fake router: 1 when any file of an ingest failed (and how
many of how many said), else by the class of the status the router answered (EXIT_CODES)."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest

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
    def _refuse(self, text: str, context) -> None:
        code = REFUSALS.get(text.split(" ", 1)[0])
        if code is not None:
            context.abort(code, f"refused {text!r}")

    def Ingest(self, request, context):
        for document in request.documents:
            self._refuse(document.content.decode(), context)
        return router_pb2.IngestResponse(documents=[router_pb2.IngestedDocument(id=d.id, chunks=2)
                                                    for d in request.documents])

    def Search(self, request, context):
        self._refuse(request.query, context)
        return router_pb2.SearchResponse(hits=[router_pb2.SearchHit(source="a.txt", text="found", score=0.5)])

    def Ask(self, request, context):
        self._refuse(request.question, context)
        return router_pb2.AskResponse(answer="yes")

    def AskStream(self, request, context):
        yield router_pb2.AskStreamResponse(token="ye")
        self._refuse(request.question, context)
        yield router_pb2.AskStreamResponse(token="s")

    def DeleteDocument(self, request, context):
        self._refuse(request.document_id, context)
        return router_pb2.DeleteDocumentResponse(removed_chunks=3)


@pytest.fixture(scope="module")
def router():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    router_pb2_grpc.add_RouterServiceServicer_to_server(FakeRouter(), server)
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
