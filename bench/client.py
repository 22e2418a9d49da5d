"""What ragloom.client costs over the raw generated stub: Search p50 of each, interleaved in one run.

A real mesh (2 shards, no gateway: the router direct), the sample documents ingested, then the same
queries searched alternately through `Client.search` (typed results, the retry policy, the token as
metadata) and through `RouterServiceStub.Search` on a plain channel, so both see the same load, caches and
noise. Target: client p50 ≤ 1.05 × stub p50.

    .venv/bin/python bench/client.py [--rounds 300] [--top-k 5]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import percentile  # noqa: E402
from ragloom.client import Client  # noqa: E402
from ragloom.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402
from tests.support.mesh import LocalMesh  # noqa: E402

SAMPLES = sorted((ROOT / "router" / "samples").iterdir())
QUERIES = ("bees dance", "Rosetta Stone", "aqueduct water", "congestion window", "lighthouse lamp",
           "sourdough starter", "photosynthesis light", "Everest summit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="searches per path (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(Path(tmp), shards=2) as mesh, \
            Client(mesh.router, timeout=30) as rag, grpc.insecure_channel(mesh.router) as channel:
        rag.ingest(SAMPLES)
        stub = router_pb2_grpc.RouterServiceStub(channel)
        paths = {
            "client": lambda q: rag.search(q, top_k=args.top_k),
            "stub": lambda q: stub.Search(router_pb2.SearchRequest(query=q, top_k=args.top_k), timeout=30),
        }
        for q in QUERIES * 3:  # warm both channels and the router's embedding of each query
            for call in paths.values():
                call(q)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(args.rounds):
            query = QUERIES[i % len(QUERIES)]
            order = list(paths) if i % 2 == 0 else list(reversed(paths))  # neither always goes first
            for name in order:
                started = time.perf_counter()
                paths[name](query)
                times[name].append((time.perf_counter() - started) * 1e3)
    p50 = {name: percentile(t, 50) for name, t in times.items()}
    p99 = {name: percentile(t, 99) for name, t in times.items()}
    ratio = p50["client"] / p50["stub"]
    for name in paths:
        print(f"{name:<7} p50 {p50[name]:7.2f} ms   p99 {p99[name]:7.2f} ms", file=sys.stderr)
    print(f"client/stub p50: {ratio:.3f} (goal ≤ 1.05)", file=sys.stderr)
    print(json.dumps({"rounds": args.rounds, "top_k": args.top_k,
                      "client_p50_ms": round(p50["client"], 3), "stub_p50_ms": round(p50["stub"], 3),
                      "client_p99_ms": round(p99["client"], 3), "stub_p99_ms": round(p99["stub"], 3),
                      "ratio_p50": round(ratio, 4), "goal": 1.05, "ok": ratio <= 1.05}))


if __name__ == "__main__":
    main()
