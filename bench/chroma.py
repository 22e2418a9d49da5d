"""Chroma (PyPI `chromadb`, an embedded HNSW database) on given vectors: the comparison bench/indexer.py
runs beside raw hnswlib and a ragloom shard.

Chroma pins its own gRPC, protobuf and OpenTelemetry versions, so it lives in its own venv, made once
outside the repo (`--setup` prints its python), and this script runs there as a child of the bench:

    .venv/bin/python bench/chroma.py --setup            # creates ~/.cache/ragloom/tools/chromadb-1.5.9

Protocol (what bench/indexer.py speaks): started with --vectors, --queries and --truth (.npy files:
float32 rows, float32 rows, int64 top-k ids) and --ef, it builds a persistent collection (cosine,
max_neighbors 16, ef_construction 200) in a temporary folder, raises ef_search from --ef until recall@k
reaches --recall (each step one `modify`), and prints one JSON line {"ready": ..., "ef": ..., "recall": ...}.
Then each line it reads, "b1" or "b32" (or "bN"), is one timed round at that batch: every query once,
N per `query` call, one call at a time; it answers one JSON line per round (calls/s, p50 and p99 per
call in ms). End of input ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VERSION = "1.5.9"
HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ragloom" / "tools" / f"chromadb-{VERSION}"


def python() -> Path:
    """The Chroma venv's python (made by --setup)."""
    return HOME / "bin" / "python"


def setup() -> Path:
    if not python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(HOME)], check=True)
        subprocess.run([str(python()), "-m", "pip", "install", "-q", f"chromadb=={VERSION}", "numpy"], check=True)
    return python()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve(args) -> None:
    import chromadb
    import numpy as np

    vectors = np.load(args.vectors)
    queries = np.load(args.queries)
    truth = np.load(args.truth)[:, : args.k]
    with tempfile.TemporaryDirectory(prefix="chroma-") as folder:
        client = chromadb.PersistentClient(path=folder)
        collection = client.create_collection("bench", configuration={"hnsw": {
            "space": "cosine", "max_neighbors": 16, "ef_construction": 200, "ef_search": args.ef}})
        ids = [str(i) for i in range(len(vectors))]
        step = client.get_max_batch_size()
        started = time.perf_counter()
        for at in range(0, len(vectors), step):
            collection.add(ids=ids[at : at + step], embeddings=vectors[at : at + step])
        build_s = time.perf_counter() - started

        def search(rows, n: int) -> list[list[int]]:
            found = []
            for at in range(0, len(rows), n):
                got = collection.query(query_embeddings=rows[at : at + n], n_results=args.k, include=[])
                found += [[int(i) for i in hit] for hit in got["ids"]]
            return found

        def recall() -> float:
            found = search(queries, 32)
            return float(np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth.tolist())]))

        ef, got = args.ef, recall()
        while got < args.recall and ef < 4096:
            ef *= 2
            collection.modify(configuration={"hnsw": {"ef_search": ef}})
            got = recall()
        print(json.dumps({"ready": True, "ef": ef, "recall": round(got, 4), "build_s": round(build_s, 1),
                          "n": len(vectors)}), flush=True)
        for line in sys.stdin:
            batch = int(line.strip().lstrip("b") or 1)
            times = []
            started = time.perf_counter()
            for at in range(0, len(queries), batch):
                t0 = time.perf_counter()
                collection.query(query_embeddings=queries[at : at + batch], n_results=args.k, include=[])
                times.append((time.perf_counter() - t0) * 1000)
            elapsed = time.perf_counter() - started
            print(json.dumps({"batch": batch, "calls_per_s": round(len(times) / elapsed, 1),
                              "queries_per_s": round(len(queries) / elapsed, 1),
                              "p50_ms": round(_percentile(times, 0.5), 3), "p99_ms": round(_percentile(times, 0.99), 3)}),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create Chroma's venv (once) and print its python")
    parser.add_argument("--vectors", type=Path)
    parser.add_argument("--queries", type=Path)
    parser.add_argument("--truth", type=Path)
    parser.add_argument("--ef", type=int, default=64, help="first ef_search to try")
    parser.add_argument("--recall", type=float, default=0.95, help="recall@k to reach by raising ef_search")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if args.setup:
        print(setup())
        return
    if not (args.vectors and args.queries and args.truth):
        parser.error("--vectors, --queries and --truth are required (or --setup)")
    serve(args)


if __name__ == "__main__":
    main()
