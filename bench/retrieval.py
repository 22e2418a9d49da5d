"""Retrieval quality of dense vs BM25 vs hybrid, and latency of Search and of cached vs uncached Ask.

Corpus and labels: bench/data/retrieval — 40 documents (with near-neighbour pairs) and 120
questions, each labelled with its document and a verbatim answer passage; a third use the
passage's rare terms ("keyword"), a third share no distinctive word with it ("paraphrase"),
a third are "mixed". A retrieved chunk is relevant when it contains the answer passage.

The three modes run against the same mesh (2 shards) in one run, through the router's
Search with `mode` set, and are compared with each other: nDCG@10 and recall@10, overall
and per question style. Target: hybrid beats both dense and BM25 alone.

Latency: p50/p99 of Search (default mode), and of Ask uncached (no_cache) vs cached (the same
questions again), generation capped at 32 tokens.

    .venv/bin/python bench/retrieval.py [--ask-questions 12]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import percentile  # noqa: E402
from tests.support.mesh import LocalMesh  # noqa: E402
from ragloom.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402

DATA = ROOT / "bench" / "data" / "retrieval"
MODES = {"dense": router_pb2.RETRIEVAL_MODE_DENSE, "bm25": router_pb2.RETRIEVAL_MODE_LEXICAL,
         "hybrid": router_pb2.RETRIEVAL_MODE_HYBRID}


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def holds_answer(hit, document: str, answer: str) -> bool:
    """The chunk holds the answer passage — or, at a chunk boundary, half of it, in the right document."""
    text = normalise(hit.text)
    if answer in text:
        return True
    half = len(answer) // 2
    return hit.document_id == document and (answer[:half] in text or answer[half:] in text)


def ndcg_at_10(relevant: list[bool]) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, r in enumerate(relevant[:10]) if r)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(10, max(1, sum(relevant)))))
    return dcg / ideal if ideal else 0.0



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ask-questions", type=int, default=12, help="questions for the Ask latency figures")
    args = parser.parse_args()
    questions = json.loads((DATA / "questions.json").read_text())

    with tempfile.TemporaryDirectory() as data, LocalMesh(Path(data), shards=2) as mesh:
        stub = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.router))
        docs = [router_pb2.Document(id=p.name, source=str(p), content=p.read_bytes()) for p in sorted((DATA / "docs").iterdir())]
        stub.Ingest(router_pb2.IngestRequest(documents=docs), timeout=300)

        scores = {mode: {"ndcg": [], "recall": [], "style": []} for mode in MODES}
        search_ms = []
        for q in questions:
            answer = normalise(q["answer"])
            for mode, value in MODES.items():
                start = time.perf_counter()
                hits = stub.Search(router_pb2.SearchRequest(query=q["question"], top_k=10, mode=value), timeout=30).hits
                if mode == "hybrid":
                    search_ms.append((time.perf_counter() - start) * 1000)
                relevant = [holds_answer(h, q["document"], answer) for h in hits]
                scores[mode]["ndcg"].append(ndcg_at_10(relevant))
                scores[mode]["recall"].append(float(any(relevant)))
                scores[mode]["style"].append(q["style"])

        uncached, cached = [], []
        for q in questions[: args.ask_questions]:
            request = router_pb2.AskRequest(question=q["question"], max_tokens=32)
            start = time.perf_counter()
            stub.Ask(router_pb2.AskRequest(question=q["question"], max_tokens=32, no_cache=True), timeout=300)
            uncached.append((time.perf_counter() - start) * 1000)
            stub.Ask(request, timeout=300)  # fills the cache (no_cache answers are stored too)
            start = time.perf_counter()
            reply = stub.Ask(request, timeout=60)
            cached.append((time.perf_counter() - start) * 1000)
            assert reply.cached

    figures: dict = {"questions": len(questions)}
    for mode, s in scores.items():
        figures[f"{mode}_ndcg@10"] = round(statistics.mean(s["ndcg"]), 4)
        figures[f"{mode}_recall@10"] = round(statistics.mean(s["recall"]), 4)
        for style in ("keyword", "paraphrase", "mixed"):
            picked = [n for n, st in zip(s["ndcg"], s["style"]) if st == style]
            figures[f"{mode}_ndcg@10_{style}"] = round(statistics.mean(picked), 4)
    figures["hybrid_beats_both"] = (figures["hybrid_ndcg@10"] > max(figures["dense_ndcg@10"], figures["bm25_ndcg@10"])
                                    and figures["hybrid_recall@10"] >= max(figures["dense_recall@10"], figures["bm25_recall@10"]))
    figures.update({
        "search_hybrid_p50_ms": round(statistics.median(search_ms), 2), "search_hybrid_p99_ms": round(percentile(search_ms, 99), 2),
    })
    if uncached:  # --ask-questions 0: retrieval quality only
        figures.update({
            "ask_uncached_p50_ms": round(statistics.median(uncached), 1), "ask_uncached_p99_ms": round(percentile(uncached, 99), 1),
            "ask_cached_p50_ms": round(statistics.median(cached), 2), "ask_cached_p99_ms": round(percentile(cached, 99), 2),
        })
        figures["ask_cached_speedup_p50"] = round(figures["ask_uncached_p50_ms"] / figures["ask_cached_p50_ms"], 1)
    print(f"{'mode':>7} {'nDCG@10':>8} {'recall@10':>9}   keyword paraphrase mixed (nDCG@10)")
    for mode in MODES:
        print(f"{mode:>7} {figures[f'{mode}_ndcg@10']:>8} {figures[f'{mode}_recall@10']:>9}   "
              f"{figures[f'{mode}_ndcg@10_keyword']:>7} {figures[f'{mode}_ndcg@10_paraphrase']:>10} {figures[f'{mode}_ndcg@10_mixed']:>5}")
    print(f"Search p50 {figures['search_hybrid_p50_ms']} ms p99 {figures['search_hybrid_p99_ms']} ms" + (
        f"; Ask uncached p50 {figures['ask_uncached_p50_ms']} ms, cached p50 {figures['ask_cached_p50_ms']} ms"
        if uncached else ""))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
