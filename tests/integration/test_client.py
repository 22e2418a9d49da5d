"""ragloom.client through the real mesh's gateway with authentication on: every method, the stream, read
your writes, and each failure as its typed exception (a deadline, bad input with its field, a bad token,
another tenant, a read-only write); the CLI's status and options end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.auth import Signer
from mesh.cli import main
from ragloom.client import (AsyncClient, Client, DeadlineExceeded, Document, Done, InvalidArgument, PermissionDenied,
                            Sources, Token, Unauthenticated)
from tests.support.mesh import LocalMesh

pytestmark = pytest.mark.integration

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "router" / "samples").iterdir())
QUESTION = "How do honeybees tell each other where flowers are?"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with LocalMesh(tmp_path_factory.mktemp("client"), shards=2, gateway=True, mtls=True, auth=True) as m:
        m.signer = Signer(m.spec.data_dir / "pki")
        yield m


@pytest.fixture(scope="module")
def token(mesh):
    return mesh.signer.mint("alice")


@pytest.fixture(scope="module")
def rag(mesh, token):
    with Client(mesh.router, token=token, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def ingested(rag):
    progress = []
    result = rag.ingest(SAMPLES, batch_size=3, progress=lambda done, total: progress.append((done, total)))
    return result, progress


@pytest.fixture(scope="module")
def tagged(rag):
    """One document with a tag, for the searches limited to it."""
    return rag.ingest(Document(text="Glassblowers shape molten glass with a blowpipe.", id="glass", tags=("crafts",)))


def test_ingest_reports_every_document_in_batches(ingested):
    result, progress = ingested
    assert [d.id for d in result.documents] == [str(p.resolve()) for p in SAMPLES]
    assert all(d.chunks > 0 for d in result.documents) and set(result.sequences) <= {0, 1} and result.sequences
    assert progress == [(3, 8), (6, 8), (8, 8)]


def test_search_with_coverage_modes_tags_and_rerank(rag, ingested, tagged):
    result = rag.search("Rosetta Stone hieroglyphs", top_k=3, min_sequences=ingested[0].sequences)
    assert Path(result[0].source).name == "rosetta-stone.txt"
    assert result.coverage.shards_answered == (0, 1) and not result.coverage.partial
    assert result.coverage.retrieval == "hybrid" and result.timings.total_ms > 0
    assert rag.search("congestion window", mode="lexical", top_k=1).coverage.retrieval == "lexical"
    reranked = rag.search("How does a sourdough starter rise?", top_k=2, rerank=True)
    assert reranked[0].evidence and reranked[0].evidence_text[0] in reranked[0].text
    hits = rag.search("molten glass blowpipe", tags=["crafts"], top_k=5, min_sequences=tagged.sequences)
    assert [h.document_id for h in hits] == ["glass"], "only chunks with the tag are visible"


def test_ask_stream_and_the_cache(rag, ingested):
    answer = rag.ask(QUESTION, max_tokens=24, min_sequences=ingested[0].sequences)
    assert answer.text and answer.sources and answer.coverage.shards_answered == (0, 1)
    assert answer.abstained or any(Path(s.source).name == "honeybees.md" for s in answer.cited)
    assert rag.ask(QUESTION, max_tokens=24).cached, "the same question again comes from the cache"
    events = list(rag.ask_stream(QUESTION, max_tokens=24, no_cache=True))
    assert isinstance(events[0], Sources) and not events[0].cached
    assert isinstance(events[-1], Done) and all(isinstance(e, Token) for e in events[1:-1])
    assert "".join(e.text for e in events[1:-1]).strip()


async def test_the_async_client(mesh, token, ingested):
    async with AsyncClient(mesh.router, token=token, timeout=120) as rag:
        assert (await rag.search("lighthouse lamp", top_k=2)).coverage.shards_answered == (0, 1)
        events = [e async for e in rag.ask_stream(QUESTION, max_tokens=24)]
        assert isinstance(events[0], Sources) and isinstance(events[-1], Done)


def test_delete_removes_the_document(rag):
    written = rag.ingest("The Antikythera mechanism is an ancient Greek orrery.", tenant="alice")
    (doc,) = written.documents
    assert rag.search("Antikythera orrery", top_k=1, min_sequences=written.sequences)[0].document_id == doc.id
    deleted = rag.delete(doc.id)
    assert deleted.removed_chunks == doc.chunks and deleted.sequences
    hits = rag.search("Antikythera orrery", top_k=3, min_sequences=deleted.sequences)
    assert doc.id not in [h.document_id for h in hits]
    assert rag.delete(doc.id).removed_chunks == 0


def test_failures_are_typed(mesh, rag, token):
    # (an Ask given too little time is refused up front: RESOURCE_EXHAUSTED, "more than the time left")
    with pytest.raises(DeadlineExceeded):
        rag.search("Why is the sky blue?", timeout=0.002)
    with pytest.raises(InvalidArgument) as info:
        rag.search("bees", top_k=0)
    assert info.value.field == "top_k", "the field violation came through the gateway"
    with pytest.raises(InvalidArgument) as info:
        rag.ask("")
    assert info.value.field == "question"
    for bad in ("not-a-token", None):
        with Client(mesh.router, token=bad, timeout=30) as stranger:
            with pytest.raises(Unauthenticated):
                stranger.search("bees")
    with pytest.raises(PermissionDenied):
        rag.search("bees", tenant="bob")
    with Client(mesh.router, token=mesh.signer.mint("alice", read_only=True), timeout=30) as reader:
        assert reader.search("bees", top_k=1)
        with pytest.raises(PermissionDenied) as info:
            reader.ingest("a read-only token cannot write")
        assert "write" in info.value.message


def test_the_cli_status_and_options_through_the_gateway(mesh, token, ingested, tagged, capsys, tmp_path):
    def ragloom(*argv: str) -> int:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--router", mesh.router, "--token", token, "--data-dir", str(tmp_path)])
        return exited.value.code

    assert ragloom("status") == 0
    out = capsys.readouterr().out
    assert "not exposed" in out and "2 answered (0, 1); 0 failed" in out
    assert ragloom("search", "molten glass", "--tag", "crafts", "--mode", "lexical", "--json") == 0
    assert [h["document_id"] for h in json.loads(capsys.readouterr().out)] == ["glass"]
    assert ragloom("search", "bees", "--tenant", "bob") == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["status", "--router", mesh.router, "--token", "bad", "--data-dir", str(tmp_path)])
    assert exited.value.code == 2 and "UNAUTHENTICATED" in capsys.readouterr().err
