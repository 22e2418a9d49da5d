"""Ingest rate and search latency of the whole mesh on the bundled sample corpus.

Starts the real mesh (embedder, 2 shards, generator, router) on loopback, ingests the
sample documents `--copies` times under distinct ids through the router (one document
per call, `--concurrency` in flight, as `ragloom ingest` does), then times searches for
the 24 paraphrased questions of tests/data/questions.json.

Baselines, measured in the same run:
  * ingest: the embedder alone embedding the same chunk texts in the same batch size
    (embedding dominates ingest; the ratio shows what parsing, chunking, routing and the
    durable shard writes add);
  * search: the embedder alone embedding the same query (the floor of a search; the
    ratio shows what the fan-out to every shard and the merge add).

    .venv/bin/python bench/spine.py [--copies 20] [--rounds 5]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import percentile  # noqa: E402
from tests.support.mesh import LocalMesh  # noqa: E402
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc  # noqa: E402
from ragloom.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=20, help="times the sample corpus is ingested (distinct ids)")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the 24 questions")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    samples = sorted((ROOT / "router" / "samples").iterdir())
    questions = [q["question"] for q in json.loads((ROOT / "tests" / "data" / "questions.json").read_text())]

    with tempfile.TemporaryDirectory() as data, LocalMesh(Path(data)) as mesh:
        router = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.router))
        embedder = embedder_pb2_grpc.EmbedderServiceStub(grpc.insecure_channel(mesh.child("embedder").address))

        docs = [
            router_pb2.Document(id=f"copy{c}/{p.name}", source=str(p), content=p.read_bytes())
            for c in range(args.copies) for p in samples
        ]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            replies = list(pool.map(lambda d: router.Ingest(router_pb2.IngestRequest(documents=[d]), timeout=300), docs))
        ingest_s = time.perf_counter() - started
        chunks = sum(r.documents[0].chunks for r in replies)

        # Baseline: the same chunk texts through the embedder alone, in the router's batch size.
        texts = [h.text for q in questions[:1] for h in router.Search(router_pb2.SearchRequest(query=q, top_k=1000), timeout=60).hits]
        texts = (texts * (chunks // max(1, len(texts)) + 1))[:chunks]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda i: embedder.Embed(embedder_pb2.EmbedRequest(texts=texts[i:i + 64]), timeout=300),
                          range(0, len(texts), 64)))
        embed_only_s = time.perf_counter() - started

        search_ms, embed_ms = [], []
        for q in questions:  # warm-up
            router.Search(router_pb2.SearchRequest(query=q, top_k=5), timeout=30)
        for _ in range(args.rounds):
            for q in questions:
                t = time.perf_counter()
                router.Search(router_pb2.SearchRequest(query=q, top_k=5), timeout=30)
                search_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                embedder.Embed(embedder_pb2.EmbedRequest(texts=[q]), timeout=30)
                embed_ms.append((time.perf_counter() - t) * 1000)

    figures = {
        "documents": len(docs),
        "chunks": chunks,
        "ingest_seconds": round(ingest_s, 2),
        "ingest_chunks_per_s": round(chunks / ingest_s, 1),
        "baseline_embed_only_chunks_per_s": round(chunks / embed_only_s, 1),
        "ingest_vs_embed_only": round(embed_only_s / ingest_s, 3),
        "search_p50_ms": round(statistics.median(search_ms), 2),
        "search_p99_ms": round(percentile(search_ms, 99), 2),
        "baseline_embed_query_p50_ms": round(statistics.median(embed_ms), 2),
        "search_p50_vs_embed_p50": round(statistics.median(search_ms) / statistics.median(embed_ms), 3),
        "searches": len(search_ms),
    }
    print(f"ingested {chunks} chunks from {len(docs)} documents in {ingest_s:.1f}s "
          f"({figures['ingest_chunks_per_s']} chunks/s; embedder alone {figures['baseline_embed_only_chunks_per_s']}/s)")
    print(f"search p50 {figures['search_p50_ms']} ms, p99 {figures['search_p99_ms']} ms "
          f"(embedding the query alone: p50 {figures['baseline_embed_query_p50_ms']} ms)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
