"""Latency of the router's Search with the query's embedding already cached: router → 2 shards → merge.

Runs `ragloom up` (2 shards, no gateway, no mTLS, no auth: the router and the shards are what is
measured) from this checkout and, with --before-root, from a checkout of earlier code, both at once;
ingests the bundled sample documents into each, searches every query once (the router caches its
embedding), then times Search calls one at a time through a synchronous stub, rounds interleaved
between the meshes (best round of each kept), in each retrieval mode: hybrid (the default: dense and
BM25 on every shard, fused), dense and lexical.

Baseline: the same Search on the --before-root checkout in the same rounds (the issue's figure for
earlier code: p50 ~7-11 ms hybrid). Target: p50 <= 3 ms with a cached embedding on 2 shards.

    .venv/bin/python bench/router_search.py [--before-root /tmp/before] [--calls 300] [--rounds 3]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import percentile  # noqa: E402
from bench.load import QUESTIONS, SAMPLES, Mesh  # noqa: E402
from ragloom.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402

MODES = {"hybrid": router_pb2.RETRIEVAL_MODE_HYBRID, "dense": router_pb2.RETRIEVAL_MODE_DENSE,
         "lexical": router_pb2.RETRIEVAL_MODE_LEXICAL}


def prepare(stub) -> None:
    docs = [router_pb2.Document(id=p.name, source=str(p), content=p.read_bytes()) for p in SAMPLES]
    stub.Ingest(router_pb2.IngestRequest(documents=docs), timeout=300)
    for mode in MODES.values():  # every query's embedding cached, every code path warm
        for _ in range(3):
            for question in QUESTIONS:
                stub.Search(router_pb2.SearchRequest(query=question, top_k=5, mode=mode), timeout=30)


def timed(stub, mode: int, calls: int) -> list[float]:
    seconds = []
    for i in range(calls):
        request = router_pb2.SearchRequest(query=QUESTIONS[i % len(QUESTIONS)], top_k=5, mode=mode)
        started = time.perf_counter()
        reply = stub.Search(request, timeout=30)
        seconds.append(time.perf_counter() - started)
        assert reply.hits and not reply.coverage.partial, reply
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-root", type=Path, default=None, help="a checkout of earlier code, measured alongside")
    parser.add_argument("--calls", type=int, default=300, help="Search calls per mode per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best of each is kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ragloom-bench-") as folder:
        roots = {"after": ROOT, **({"before": args.before_root.resolve()} if args.before_root else {})}
        meshes = {}
        for name, root in roots.items():
            (Path(folder) / name).mkdir()
            meshes[name] = Mesh(root, Path(folder) / name)
        try:
            for mesh in meshes.values():
                asyncio.run(mesh.start())
            channels = {name: grpc.insecure_channel(mesh.router) for name, mesh in meshes.items()}
            stubs = {name: router_pb2_grpc.RouterServiceStub(channel) for name, channel in channels.items()}
            for stub in stubs.values():
                prepare(stub)
            best: dict[str, dict] = {}
            for _ in range(args.rounds):
                for mode, value in MODES.items():
                    for name, stub in stubs.items():
                        seconds = timed(stub, value, args.calls)
                        key = f"{name}_{mode}"
                        if key not in best or sum(seconds) < best[key]["_total"]:
                            best[key] = {"_total": sum(seconds),
                                         "p50_ms": round(percentile(seconds, 50) * 1e3, 3),
                                         "p99_ms": round(percentile(seconds, 99) * 1e3, 3),
                                         "calls_per_s": round(len(seconds) / sum(seconds), 1)}
            for channel in channels.values():
                channel.close()
        finally:
            for mesh in meshes.values():
                mesh.stop()
    for figures in best.values():
        del figures["_total"]
    for key, figures in best.items():
        print(f"{key:16s} {figures}", file=sys.stderr)
    result = {"shards": 2, "calls": args.calls, "rounds": args.rounds, "top_k": 5, **best,
              "baseline": "the same Search on the --before-root checkout, same rounds" if args.before_root else "none",
              "targets": {"hybrid_p50_le_3ms": best["after_hybrid"]["p50_ms"] <= 3.0,
                          "dense_p50_le_3ms": best["after_dense"]["p50_ms"] <= 3.0}}
    if "before" in meshes:
        for mode in MODES:
            result[f"{mode}_p50_before_over_after"] = round(best[f"before_{mode}"]["p50_ms"] / best[f"after_{mode}"]["p50_ms"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
