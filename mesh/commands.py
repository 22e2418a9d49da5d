"""Client commands of the CLI: ingest, ask, search, delete — all through the Python client (ragloom.client)
over the router's public API, so the CLI and library users share one path: deadlines, retries, typed errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import grpc
from tqdm import tqdm

from mesh.auth import client_token
from ragloom.client import Answer, Client, Done, RagloomError, Source, Sources, Token, Unavailable
from router.parsing import supported


def client(args: argparse.Namespace) -> Client:
    """The client a command calls the router with: --router, --timeout as the default deadline, and the token
    of --token, else RAGLOOM_TOKEN, else the development token in DATA_DIR/pki."""
    token = args.token if args.token is not None else client_token(os.environ, args.data_dir)
    return Client(args.router, token or None, timeout=args.timeout)


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


def fail(args: argparse.Namespace, exc: RagloomError) -> int:
    """Says why a call failed (and, for the usual two, what to do about it); the exit status for its code."""
    print(f"ragloom: {exc.code.name}: {exc.message}", file=sys.stderr)
    if exc.retry_after is not None:
        print(f"ragloom: the router asks to wait {exc.retry_after:.1f}s before trying again", file=sys.stderr)
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        print(f"ragloom: is the mesh running (`ragloom up`)? router address: {args.router}", file=sys.stderr)
    elif exc.code == grpc.StatusCode.UNAUTHENTICATED:
        print(f"ragloom: set RAGLOOM_TOKEN (or --token) to a token for this mesh; `ragloom up` writes one to "
              f"{args.data_dir / 'pki' / 'token'} and `ragloom token --tenant NAME` mints more", file=sys.stderr)
    return exit_code(exc.code)


def _scope(args: argparse.Namespace) -> dict:
    """The options of --tenant, --tag, --mode and --require-complete (search and ask)."""
    return {"tenant": args.tenant, "tags": args.tags, "mode": args.mode, "require_complete": args.require_complete}


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
    rag = client(args)
    chunks = ingested = 0
    started = time.perf_counter()

    def send(path: Path) -> int:  # one file a call: a file the router refuses is reported alone
        return rag.ingest(path, tenant=args.tenant, tags=args.tags).chunks

    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool, \
            tqdm(total=len(files), unit="file", desc="ingesting", file=sys.stderr, disable=args.json or None) as bar:
        futures = {pool.submit(send, f): f for f in files}
        for future in as_completed(futures):
            path = futures[future]
            try:
                chunks += future.result()
                ingested += 1
            except Unavailable as exc:
                if not chunks:  # no router reached at all: one message, not one per file
                    pool.shutdown(cancel_futures=True)
                    return fail(args, exc)
                failures.append((str(path), str(exc)))
                bar.write(f"skipped {path}: {exc.message}", file=sys.stderr)
            except RagloomError as exc:
                failures.append((str(path), str(exc)))
                bar.write(f"skipped {path}: {exc.message}", file=sys.stderr)
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


def _ask_options(args: argparse.Namespace) -> dict:
    return {**_scope(args), "top_k": args.top_k, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "no_cache": args.no_cache}


def _source_json(s: Source) -> dict:
    return {"number": s.number, "score": round(s.score, 4), "document_id": s.document_id,
            "source": s.source, "chunk_id": s.chunk_id, "shard_id": s.shard_id, "text": s.text,
            "evidence": s.evidence_text}


def _timings_json(timings) -> dict:
    return {k: round(v, 1) for k, v in asdict(timings).items() if v}


def _answer_json(a: Answer) -> dict:
    return {
        "answer": a.text, "abstained": a.abstained, "extractive": a.extractive, "cached": a.cached,
        "citations": list(a.citations),
        "support": [{"source": s.source, "text": s.text, "start": s.span.start, "end": s.span.end} for s in a.support],
        "sources": [_source_json(s) for s in a.sources],
        "coverage": asdict(a.coverage), "degraded": list(a.degraded),
        "timings": _timings_json(a.timings),
    }


def _support_lines(support, sources: list[Source]) -> list[str]:
    names = {s.number: s.source for s in sources}
    return [f"  [{s.source}] {names.get(s.source, '')}: “{' '.join(s.text.split())[:200]}”" for s in support]


def _partial(coverage) -> None:
    if coverage.partial:
        print(f"ragloom: partial results: shard(s) {', '.join(map(str, coverage.shards_failed))} did not answer",
              file=sys.stderr)
    for line in coverage.degraded:
        print(f"ragloom: degraded: {line}", file=sys.stderr)


def ask(args: argparse.Namespace) -> int:
    rag = client(args)
    try:
        if args.json:
            print(json.dumps(_answer_json(rag.ask(args.question, **_ask_options(args))), indent=2))
            return 0
        sources: list[Source] = []
        done = None
        for event in rag.ask_stream(args.question, **_ask_options(args)):
            if isinstance(event, Sources):
                sources = list(event.sources)
                _partial(event.coverage)
            elif isinstance(event, Token):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Done):
                done = event
    except RagloomError as exc:
        print()
        return fail(args, exc)
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


def search(args: argparse.Namespace) -> int:
    try:
        result = client(args).search(args.query, top_k=args.top_k, rerank=args.rerank, **_scope(args))
    except RagloomError as exc:
        return fail(args, exc)
    hits = [{"score": round(h.score, 4), "document_id": h.document_id, "source": h.source,
             "chunk_id": h.chunk_id, "shard_id": h.shard_id, "text": h.text, "evidence": h.evidence_text}
            for h in result]
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    _partial(result.coverage)
    for i, h in enumerate(hits, 1):
        snippet = " ".join((h["evidence"][0] if h["evidence"] else h["text"]).split())[:160]
        print(f"{i:>2}. {h['score']:.3f}  {h['source']}\n    {snippet}…")
    if not hits:
        print("no results (is anything ingested?)")
    return 0


def delete(args: argparse.Namespace) -> int:
    rag = client(args)
    for doc_id in args.document_ids:
        try:
            removed = rag.delete(doc_id, tenant=args.tenant).removed_chunks
        except RagloomError as exc:
            return fail(args, exc)
        print(f"{doc_id}: removed {removed} chunks")
    return 0
