"""Who is asking, through the whole mesh: the gateway verifies each bearer token and the router acts for
the token's tenant only. A randomized probe across three tenants (search, ask, ask:stream, cached
replays, ingest, delete; REST and gRPC; forged headers, other tenants' scopes, read-only writes)
finds no response carrying another tenant's document. Limits refuse oversized work before any
model runs, and a retried Ingest is one write."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from fabric.tls import LocalCA
from mesh import policy
from mesh.auth import Signer
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from ragloom.router.v1 import router_pb2, router_pb2_grpc
from tests.support.mesh import LocalMesh

pytestmark = pytest.mark.integration

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "router" / "samples").iterdir())
TENANTS = ("alice", "bob", "carol")
QUESTIONS = ("How do honeybees tell each other where flowers are?", "Who decoded the hieroglyphs?",
             "How does a sourdough starter rise?")
QUERIES = ("bees dance", "Rosetta Stone", "aqueduct water", "congestion window", "lighthouse lamp")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with LocalMesh(tmp_path_factory.mktemp("auth"), shards=2, gateway=True, mtls=True, auth=True) as m:
        signer = Signer(m.spec.data_dir / "pki")
        with grpc.insecure_channel(m.router) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            for tenant in TENANTS:  # every tenant the same texts: any leak would show
                docs = [router_pb2.Document(id=f"{tenant}:{p.name}", source=p.name, content=p.read_bytes())
                        for p in SAMPLES]
                stub.Ingest(router_pb2.IngestRequest(documents=docs), timeout=120,
                            metadata=bearer(signer.mint(tenant)))
        m.signer = signer
        yield m


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def rest(mesh, path: str, body, token: str | None, method: str = "POST", headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{mesh.router}{path}", data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"text": text.decode(errors="replace")}


def test_no_token_is_refused_and_the_cli_token_works(mesh):
    status, body = rest(mesh, "/v1/search", {"query": "bees"}, None)
    assert status == 401
    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(router_pb2.SearchRequest(query="bees"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token_file = mesh.spec.data_dir / "pki" / "token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        reply = stub.Search(router_pb2.SearchRequest(query="bees"), timeout=10,
                            metadata=bearer(token_file.read_text().strip()))
        assert reply.hits == [], "the development token's tenant ('default') has no documents here"


def test_another_tenants_scope_and_read_only_writes_are_permission_denied(mesh):
    alice, reader = mesh.signer.mint("alice"), mesh.signer.mint("alice", read_only=True)
    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(router_pb2.SearchRequest(query="bees", scope=router_pb2.Scope(tenant="bob")), timeout=10,
                        metadata=bearer(alice))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'bob'" in info.value.details()
        for call in (lambda: stub.Ingest(router_pb2.IngestRequest(documents=[router_pb2.Document(id="x", text="x")]),
                                         timeout=10, metadata=bearer(reader)),
                     lambda: stub.DeleteDocument(router_pb2.DeleteDocumentRequest(document_id="alice:sourdough.md"),
                                                 timeout=10, metadata=bearer(reader))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "write" in info.value.details()
        assert stub.Search(router_pb2.SearchRequest(query="bees"), timeout=10, metadata=bearer(reader)).hits
    status, body = rest(mesh, "/v1/documents/alice:sourdough.md", None, reader, method="DELETE")
    assert status == 403 and "write" in body["message"]


def test_a_randomized_probe_never_returns_another_tenants_document(mesh):
    rng = random.Random(14)
    tokens = {t: mesh.signer.mint(t) for t in TENANTS}
    readers = {t: mesh.signer.mint(t, read_only=True) for t in TENANTS}
    tenant_header = policy.load().edge.auth.tenant_header
    kinds = ["search", "search", "ask", "ask_stream", "ask_replay", "ingest", "delete", "forged", "other_scope",
             "read_only_write"]
    plan = [(rng.choice(TENANTS), rng.choice(kinds), rng.choice(("grpc", "rest")), i) for i in range(520)]
    seen: dict[str, int] = {}

    def check(tenant: str, doc_ids: list[str]) -> None:
        leaked = [d for d in doc_ids if not d.startswith(f"{tenant}:")]
        assert not leaked, f"{tenant} was shown {leaked}"

    def one(step) -> str:
        tenant, kind, plane, i = step
        token = tokens[tenant]
        other = TENANTS[(TENANTS.index(tenant) + 1) % 3]
        headers = {tenant_header: other} if kind == "forged" else {}
        with grpc.insecure_channel(mesh.router) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            md = bearer(token) + list(headers.items())
            if kind in ("search", "forged"):
                query = rng.choice(QUERIES)
                if plane == "grpc":
                    hits = stub.Search(router_pb2.SearchRequest(query=query, top_k=8), timeout=60, metadata=md).hits
                    check(tenant, [h.document_id for h in hits])
                else:
                    status, body = rest(mesh, "/v1/search", {"query": query, "top_k": 8}, token, headers=headers)
                    assert status == 200, body
                    check(tenant, [h["document_id"] for h in body["hits"]])
                return kind
            if kind in ("ask", "ask_replay", "ask_stream"):
                question = QUESTIONS[i % len(QUESTIONS)] if kind == "ask_replay" else rng.choice(QUESTIONS)
                ask = {"question": question, "max_tokens": 8}
                if kind == "ask_stream" and plane == "grpc":
                    events = list(stub.AskStream(router_pb2.AskRequest(**ask), timeout=120, metadata=md))
                    check(tenant, [s.document_id for s in events[0].sources.sources])
                elif kind == "ask_stream":
                    status, events = rest(mesh, "/v1/ask:stream", ask, token)
                    assert status == 200, events
                    check(tenant, [s["document_id"] for s in events[0]["sources"]["sources"]])
                elif plane == "grpc":
                    reply = stub.Ask(router_pb2.AskRequest(**ask), timeout=120, metadata=md)
                    check(tenant, [s.document_id for s in reply.sources])
                    return "ask_cached" if reply.cached else kind
                else:
                    status, reply = rest(mesh, "/v1/ask", ask, token)
                    assert status == 200, reply
                    check(tenant, [s["document_id"] for s in reply["sources"]])
                    return "ask_cached" if reply["cached"] else kind
                return kind
            if kind == "ingest":
                sample = SAMPLES[i % len(SAMPLES)]
                doc = {"id": f"{tenant}:extra-{i}", "source": sample.name, "text": sample.read_text()[:2000]}
                if plane == "grpc":
                    stub.Ingest(router_pb2.IngestRequest(documents=[router_pb2.Document(**doc)]), timeout=60,
                                metadata=md)
                else:
                    status, body = rest(mesh, "/v1/documents", {"documents": [doc]}, token)
                    assert status == 200, body
                return kind
            if kind == "delete":  # an id of another tenant's document: acts in the caller's own tenant
                victim = f"{other}:{SAMPLES[i % len(SAMPLES)].name}"
                if plane == "grpc":
                    removed = stub.DeleteDocument(router_pb2.DeleteDocumentRequest(document_id=victim), timeout=60,
                                                  metadata=md).removed_chunks
                else:
                    status, body = rest(mesh, f"/v1/documents/{victim}", None, token, method="DELETE")
                    assert status == 200, body
                    removed = body["removed_chunks"]
                assert removed == 0
                return kind
            if kind == "other_scope":
                if plane == "grpc":
                    with pytest.raises(grpc.RpcError) as info:
                        stub.Search(router_pb2.SearchRequest(query="bees", scope=router_pb2.Scope(tenant=other)),
                                    timeout=60, metadata=md)
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                else:
                    status, _ = rest(mesh, "/v1/search", {"query": "bees", "scope": {"tenant": other}}, token)
                    assert status == 403
                return kind
            # read-only write
            if plane == "grpc":
                with pytest.raises(grpc.RpcError) as info:
                    stub.Ingest(router_pb2.IngestRequest(documents=[router_pb2.Document(id=f"{tenant}:ro", text="x")]),
                                timeout=60, metadata=bearer(readers[tenant]))
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            else:
                status, _ = rest(mesh, "/v1/documents", {"documents": [{"id": f"{tenant}:ro", "text": "x"}]},
                                 readers[tenant])
                assert status == 403
            return kind

    with ThreadPoolExecutor(4) as pool:
        for kind in pool.map(one, plan):
            seen[kind] = seen.get(kind, 0) + 1
    print("probe:", dict(sorted(seen.items())))
    assert sum(seen.values()) == 520
    assert seen.get("ask_cached", 0) > 0, "cached replays were probed too"
    # every tenant still has all of its documents (no cross-tenant delete landed), and only its own
    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for tenant in TENANTS:
            hits = stub.Search(router_pb2.SearchRequest(query="Rosetta Stone hieroglyphs", top_k=50), timeout=60,
                               metadata=bearer(tokens[tenant])).hits
            assert f"{tenant}:rosetta-stone.txt" in {h.document_id for h in hits}
            check(tenant, [h.document_id for h in hits])


def test_a_5mb_question_is_refused_before_any_model_work(mesh):
    token = mesh.signer.mint("alice")
    question = "bee " * 1_300_000
    with grpc.insecure_channel(mesh.router, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        stub.Search(router_pb2.SearchRequest(query="warm"), timeout=30, metadata=bearer(token))
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            stub.Ask(router_pb2.AskRequest(question=question), timeout=30, metadata=bearer(token))
        took = time.perf_counter() - start
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens" in info.value.details()
    start = time.perf_counter()
    status, body = rest(mesh, "/v1/search", {"query": question}, token)
    rest_took = time.perf_counter() - start
    assert status == 400 and body["message"].startswith("query")
    print(f"5 MB question refused in {took * 1e3:.0f} ms (gRPC), {rest_took * 1e3:.0f} ms (REST)")
    assert took < 2.0 and rest_took < 2.0, "refused before embedding or generating (it took 9-37 s)"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _post_large(address: str, path: str, token: str, size: int) -> int:
    """POSTs a `size`-byte JSON body the way curl does (reading the reply while it sends): the HTTP status."""
    host, port = address.rsplit(":", 1)
    prefix = b'{"documents":[{"id":"alice:huge","text":"'
    suffix = b'"}]}'
    head = (f"POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {token}\r\ncontent-length: {size}\r\n\r\n").encode()

    def send(sock) -> None:
        try:
            sock.sendall(head + prefix)
            left, chunk = size - len(prefix) - len(suffix), b"a" * (1 << 20)
            while left > 0:
                sock.sendall(chunk[:left])
                left -= len(chunk)
            sock.sendall(suffix)
        except OSError:
            pass  # the gateway refused the rest: the reply says why

    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()
        reply = b""
        while b"\r\n" not in reply:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
        sender.join(timeout=60)
    return int(reply.split(b" ", 2)[1])


def test_a_100mb_body_gets_413_and_the_gateway_stays_small(mesh):
    gateway = mesh.child("gateway").process.pid
    before = _rss_kb(gateway)
    status = _post_large(mesh.router, "/v1/documents", mesh.signer.mint("alice"), 100_000_000)
    assert status == 413
    grown_mb = (_rss_kb(gateway) - before) / 1024
    limit_mb = policy.load().edge.max_request_bytes / 2 ** 20
    print(f"gateway RSS grew {grown_mb:.1f} MB for a 100 MB body (limit {limit_mb:.0f} MB)")
    assert grown_mb < 2 * limit_mb + 16


def test_a_retried_ingest_is_one_write(mesh):
    token = mesh.signer.mint("carol")
    doc = router_pb2.Document(id="carol:retried", text="A retried ingest of the same document is one write.")
    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        first = stub.Ingest(router_pb2.IngestRequest(documents=[doc]), timeout=60, metadata=bearer(token))
        again = stub.Ingest(router_pb2.IngestRequest(documents=[doc]), timeout=60, metadata=bearer(token))
    assert dict(first.sequences) == dict(again.sequences), "the log kept one entry: the retry was deduplicated"


def test_embed_stream_with_the_generators_certificate_is_permission_denied(mesh):
    traffic = policy.load()
    generator = LocalCA(mesh.spec.data_dir / "pki").issue("generator-probe", traffic.spiffe_id("generator"))
    with grpc.secure_channel(mesh.child("embedder").address, generator.channel_credentials()) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.EmbedStream(iter([embedder_pb2.EmbedRequest(texts=["hello"])]), timeout=10))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
