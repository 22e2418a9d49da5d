"""Client commands of the CLI: ingest, ask, search, delete — all through the router's public API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import grpc
from tqdm import tqdm

from mesh.auth import client_token
from ragloom.router.v1 import router_pb2, router_pb2_grpc
from router.parsing import supported


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends `authorization: Bearer <token>` with every call."""

    def __init__(self, token: str):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def _stub(args: argparse.Namespace) -> router_pb2_grpc.RouterServiceStub:
    size = 64 * 1024 * 1024
    channel = grpc.insecure_channel(
        args.router, options=[("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]
    )
    token = args.token if args.token is not None else client_token(os.environ, args.data_dir)
    if token:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    return router_pb2_grpc.RouterServiceStub(channel)


#: What a client command's exit status means, for each one's --help.
_REFUSED = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE,
})
_TRY_LATER = frozenset({
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
})


def exit_code(code: grpc.StatusCode) -> int:
    """The exit status of a command whose call ended with `code` (mesh.cli.EXIT_CODES): scripts tell what to do
    next (fix the request, retry later, give up) without parsing messages."""
    if code is grpc.StatusCode.OK:
        return 0
    return 2 if code in _REFUSED else 3 if code in _TRY_LATER else 1


def _fail(args: argparse.Namespace, exc: grpc.RpcError) -> int:
    print(f"ragloom: {exc.code().name}: {exc.details()}", file=sys.stderr)
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        print(f"ragloom: is the mesh running (`ragloom up`)? router address: {args.router}", file=sys.stderr)
    elif exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        print(f"ragloom: set RAGLOOM_TOKEN (or --token) to a token for this mesh; `ragloom up` writes one to "
              f"{args.data_dir / 'pki' / 'token'} and `ragloom token --tenant NAME` mints more", file=sys.stderr)
    return exit_code(exc.code())


def _files(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to ingest (folders walked for supported types) and paths that cannot be used."""
    found, problems = [], []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and supported(p.name)
                                and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.is_file():
            found.append(path)
        else:
            problems.append((path, "no such file or folder"))
    return found, problems


def _sample_files() -> list[Path]:
    import router

    folder = Path(router.__file__).parent / "samples"
    return sorted(p for p in folder.iterdir() if p.is_file() and supported(p.name))


def ingest(args: argparse.Namespace) -> int:
    paths = list(args.paths) + (_sample_files() if args.sample else [])
    if not paths:
        print("ragloom ingest: name files or folders, or --sample", file=sys.stderr)
        return 2
    files, failures = _files(paths)
    failures = [(str(p), why) for p, why in failures]
    total = len(files) + len(failures)
    stub = _stub(args)
    chunks = ingested = 0
    started = time.perf_counter()

    def send(path: Path) -> router_pb2.IngestResponse:
        source = str(path.resolve())
        doc = router_pb2.Document(id=source, source=source, content=path.read_bytes())
        return stub.Ingest(router_pb2.IngestRequest(documents=[doc]), timeout=args.timeout)

    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool, \
            tqdm(total=len(files), unit="file", desc="ingesting", file=sys.stderr, disable=args.json or None) as bar:
        futures = {pool.submit(send, f): f for f in files}
        for future in as_completed(futures):
            path = futures[future]
            try:
                chunks += sum(d.chunks for d in future.result().documents)
                ingested += 1
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and not chunks:
                    pool.shutdown(cancel_futures=True)
                    return _fail(args, exc)
                failures.append((str(path), f"{exc.code().name}: {exc.details()}"))
                bar.write(f"skipped {path}: {exc.details()}", file=sys.stderr)
            except OSError as exc:
                failures.append((str(path), str(exc)))
                bar.write(f"skipped {path}: {exc}", file=sys.stderr)
            bar.update()
    elapsed = time.perf_counter() - started
    summary = {
        "files": ingested, "total": total, "chunks": chunks, "failed": [{"path": p, "error": e} for p, e in failures],
        "seconds": round(elapsed, 3), "chunks_per_second": round(chunks / elapsed, 1) if elapsed else 0.0,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"ingested {ingested} file(s), {chunks} chunks in {elapsed:.1f}s "
              f"({summary['chunks_per_second']} chunks/s); {len(failures)} of {total} failed")
        for path, error in failures:
            print(f"  failed: {path}: {error}")
    # Any file left out fails the command: a script must not take a partial ingest for a whole one.
    return 1 if failures else 0


def _ask_request(args: argparse.Namespace) -> router_pb2.AskRequest:
    request = router_pb2.AskRequest(question=args.question)
    if args.top_k is not None:
        request.top_k = args.top_k
    if args.max_tokens is not None:
        request.max_tokens = args.max_tokens
    return request


def _source_json(s: router_pb2.Source) -> dict:
    return {"number": s.number, "score": round(s.score, 4), "document_id": s.document_id,
            "source": s.source, "chunk_id": s.chunk_id, "shard_id": s.shard_id, "text": s.text,
            "evidence": [s.text[e.start:e.end] for e in s.evidence]}


def _support_lines(support, sources: list[router_pb2.Source]) -> list[str]:
    names = {s.number: s.source for s in sources}
    return [f"  [{s.source}] {names.get(s.source, '')}: “{' '.join(s.text.split())[:200]}”" for s in support]


def ask(args: argparse.Namespace) -> int:
    stub = _stub(args)
    try:
        if args.json:
            reply = stub.Ask(_ask_request(args), timeout=args.timeout)
            print(json.dumps({
                "answer": reply.answer, "abstained": reply.abstained, "extractive": reply.extractive,
                "citations": list(reply.citations),
                "support": [{"source": s.source, "text": s.text, "start": s.span.start, "end": s.span.end}
                            for s in reply.support],
                "sources": [_source_json(s) for s in reply.sources],
                "timings": {k: round(v, 1) for k, v in _fields(reply.timings).items()},
            }, indent=2))
            return 0
        sources: list[router_pb2.Source] = []
        done = None
        for event in stub.AskStream(_ask_request(args), timeout=args.timeout):
            kind = event.WhichOneof("event")
            if kind == "sources":
                sources = list(event.sources.sources)
            elif kind == "token":
                sys.stdout.write(event.token)
                sys.stdout.flush()
            elif kind == "done":
                done = event.done
    except grpc.RpcError as exc:
        print()
        return _fail(args, exc)
    cited = list(done.citations) if done else []
    if done and done.abstained:
        print("\n\nNot found in your documents. The closest passages:")
    else:
        if done and done.support:
            print("\n\nSupported by:")
            print("\n".join(_support_lines(done.support, sources)))
        print("\n\nSources:" if not (done and done.support) else "\nSources:")
    for s in sources:
        mark = "*" if s.number in cited else " "
        print(f" {mark}[{s.number}] {s.source}  (score {s.score:.3f})")
    if done:
        t = done.timings
        kind = " · quoted from the evidence (no generated sentence could be verified)" if done.extractive else ""
        print(f"\n* cited{kind} · first token {t.time_to_first_token_ms:.0f} ms · total {t.total_ms:.0f} ms · "
              f"{done.completion_tokens} tokens", file=sys.stderr)
    return 0


def _fields(message) -> dict:
    return {field.name: value for field, value in message.ListFields()}


def search(args: argparse.Namespace) -> int:
    request = router_pb2.SearchRequest(query=args.query)
    if args.top_k is not None:
        request.top_k = args.top_k
    if getattr(args, "rerank", False):
        request.rerank = True
    try:
        reply = _stub(args).Search(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail(args, exc)
    hits = [{"score": round(h.score, 4), "document_id": h.document_id, "source": h.source,
             "chunk_id": h.chunk_id, "shard_id": h.shard_id, "text": h.text,
             "evidence": [h.text[e.start:e.end] for e in h.evidence]} for h in reply.hits]
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    for i, h in enumerate(hits, 1):
        snippet = " ".join((h["evidence"][0] if h["evidence"] else h["text"]).split())[:160]
        print(f"{i:>2}. {h['score']:.3f}  {h['source']}\n    {snippet}…")
    if not hits:
        print("no results (is anything ingested?)")
    return 0


def delete(args: argparse.Namespace) -> int:
    stub = _stub(args)
    for doc_id in args.document_ids:
        try:
            reply = stub.DeleteDocument(router_pb2.DeleteDocumentRequest(document_id=doc_id), timeout=args.timeout)
        except grpc.RpcError as exc:
            return _fail(args, exc)
        print(f"{doc_id}: removed {reply.removed_chunks} chunks")
    return 0
