"""Answer quality: is the answer right, is the citation right, does it abstain when the documents cannot answer?

Corpus and labels: bench/data/answers — real man pages of this machine (rendered by bench/corpus.py) and
questions written by hand from them, paraphrased away from the pages' wording, each with a reference
answer pattern (a regex) and the page that holds it, plus questions no page answers: 22 written with the set
(7 off-topic, 15 near misses) and 40 near misses, one for each page (near_misses.json: an option the command
does not have).

A second set (`--set prose`): the 40 prose documents and 120 questions of bench/data/retrieval (a third
keyword, a third paraphrase, a third mixed), each labelled with a verbatim answer passage, and 40
unanswerable near misses, one about each document (unanswerable.json: a figure the article never gives);
an answer is right when it holds most of the passage's key words (see load_prose).

The real mesh runs once (2 shards, the packaged SmolLM2-135M); each configuration is one more router
process over the same embedder, shards and generator, so all run against the same services in one run:

    today        the pipeline before reranking: 4 whole passages, the model's own answer, never abstains
                 (the named baseline)
    default      rerank → best evidence sentences → verify each answer sentence → quote or abstain
    no-rerank    default without the reranker: the top fused passage is the evidence, no abstention gate
    no-reserve   default, but the rerank candidates are the fused top 12 alone (no seats for each method's best 3)
    no-verify    default without the sentence check (the abstention gate stays)
    any-paraphrase  default, but a paraphrase may add any number of words of its own (before that check)
    new-words-N  default, but a sentence kept as the evidence's words may add at most N words of its own
    passages     default, but the model sees 4 whole passages as today
    model        default with --model-path's GGUF as the generator (only when given)

Per configuration: answer accuracy (the reference pattern is in a non-abstained answer), citation
precision (cited sources that hold the answer), abstention on unanswerable questions, false abstention
on answerable ones, time to first answer text and total time (p50, client side, uncached).

    .venv/bin/python bench/answers.py [--configs default,today] [--limit N] [--model-path FILE.gguf]
    .venv/bin/python bench/answers.py --fit     # fits the reranker weights and the abstention threshold

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import corpus  # noqa: E402
from bench.common import percentile  # noqa: E402
from tests.support.mesh import LocalMesh  # noqa: E402
from tests.support.ports import free_port_block  # noqa: E402
from mesh.launcher import Child, start_child, wait_ready, stop_all  # noqa: E402
from ragloom.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402

DATA = ROOT / "bench" / "data" / "answers"
CONFIGS = {
    "today": ["--no-rerank", "--no-verify", "--prompt", "passages", "--abstain-below", "-1", "--max-tokens", "256"],
    "default": [],
    "no-rerank": ["--no-rerank"],
    "no-reserve": ["--rerank-reserved", "0"],  # the rerank candidates by fused rank alone
    "no-reread": ["--reread-sentences", "0"],  # the reranker's order, not re-read by the generator's model
    "lift-5": ["--reread-abstain-below", "5"],  # abstaining when the reading lifts the question under 5 nats
    # Never abstains on the lift, and reads each ask's lift from the router's log: the figures at every
    # lift threshold, from one run (an answer the gate lets through does not depend on the threshold).
    "lift-curve": ["--reread-abstain-below", "-1", "--log-level", "DEBUG"],
    "no-verify": ["--no-verify"],
    "any-paraphrase": ["--max-paraphrase-new-words", "-1"],
    "new-words-0": ["--max-new-words", "0"],
    "new-words-1": ["--max-new-words", "1"],
    "passages": ["--prompt", "passages"],
    "abstain-0.4": ["--abstain-below", "0.4"],
    "abstain-0.4-quote-0.55": ["--abstain-below", "0.4", "--quote-min-score", "0.55"],
    # Never abstains: its answers and top scores show where the abstention thresholds belong.
    "calibrate": ["--abstain-below", "-1"],
}


PROSE = ROOT / "bench" / "data" / "retrieval"


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def load_questions() -> list[dict]:
    return json.loads((DATA / "questions.json").read_text()) + load_near_misses(DATA / "near_misses.json")


def load_near_misses(path: Path) -> list[dict]:
    """Unanswerable questions asked about a document of the set ("about") that it does not answer: an option
    the command does not have, a figure the article never gives; "absent" is a pattern of what the answer
    would need, found nowhere in that document (tests/test_bench_data.py checks the prose ones)."""
    return [{"id": q["id"], "document": None, "question": q["question"], "answer": None, "evidence": None,
             "about": q["about"]} for q in json.loads(path.read_text())]


def load_prose() -> tuple[dict[str, str], list[dict]]:
    """The second labelled set: bench/data/retrieval's 40 prose documents, its 120 answerable questions, each
    labelled with a verbatim answer passage, and its 40 unanswerable ones. An answer is right when it holds the
    passage's key: its content words that the question does not have — at least 40 % of them, or every
    capitalised one (a name answers a "who" with few words)."""
    from fabric.text import content_words

    pages = {p.stem: p.read_text() for p in sorted((PROSE / "docs").iterdir())}
    questions = []
    for q in json.loads((PROSE / "questions.json").read_text()):
        asked = set(content_words(q["question"]))
        key = [w for w in dict.fromkeys(content_words(q["answer"])) if w not in asked]
        names = [w for w in dict.fromkeys(re.findall(r"\b[A-Z][a-z]+", q["answer"]))
                 if w.lower() not in q["question"].lower()]
        questions.append({"id": q["id"], "document": q["document"].removesuffix(".txt"), "question": q["question"],
                          "evidence": q["answer"], "key": key, "names": names})
    return pages, questions + load_near_misses(PROSE / "unanswerable.json")


def is_right(answer: str, q: dict) -> bool:
    """The answer holds the reference: the man pages' pattern, or the prose set's key."""
    if "key" not in q:
        return bool(re.search(q["answer"], answer, re.I))
    from fabric.text import content_words

    said = set(content_words(answer))
    if q["names"] and all(name in answer for name in q["names"]):
        return True
    return bool(q["key"]) and sum(w in said for w in q["key"]) >= 0.4 * len(q["key"])


def ingest(stub, pages: dict[str, str]) -> None:
    docs = [router_pb2.Document(id=name, source=f"{name}.txt", text=text, format="txt") for name, text in pages.items()]
    for i in range(0, len(docs), 16):
        stub.Ingest(router_pb2.IngestRequest(documents=docs[i : i + 16]), timeout=600)


def holds_answer(source, q: dict) -> bool:
    """The cited passage is from the right page and holds the answer (its evidence, or the pattern)."""
    if source.document_id != q["document"]:
        return False
    text, passage = normalise(source.text), normalise(q["evidence"])
    if "key" in q:  # prose: the passage, or at a chunk boundary half of it
        half = len(passage) // 2
        return passage in text or passage[:half] in text or passage[half:] in text
    return passage in text or bool(re.search(q["answer"], source.text, re.I))


def ask(stub, question: str) -> dict:
    start = time.perf_counter()
    first, text, sources, done = None, [], [], None
    for event in stub.AskStream(router_pb2.AskRequest(question=question, no_cache=True), timeout=300):
        kind = event.WhichOneof("event")
        if kind == "sources":
            sources = list(event.sources.sources)
        elif kind == "token":
            first = first or time.perf_counter()
            text.append(event.token)
        else:
            done = event.done
    end = time.perf_counter()
    return {"answer": "".join(text), "sources": sources, "citations": list(done.citations),
            "abstained": done.abstained, "extractive": done.extractive,
            "ttft_ms": ((first or end) - start) * 1000, "total_ms": (end - start) * 1000}


LIFT = re.compile(r"reread: lift (-?[0-9.]+) nats")


def evaluate(stub, questions: list[dict], name: str, verbose: bool,
             log: Path | None = None) -> tuple[dict, list[dict]]:
    """Every question asked in turn; with `log` (the router's, at DEBUG), each ask's lift read from it too."""
    rows = []
    for i, q in enumerate(questions):
        logged = log.stat().st_size if log else 0
        r = ask(stub, q["question"])
        if log:
            with log.open("rb") as f:
                f.seek(logged)
                found = LIFT.search(f.read().decode(errors="replace"))
            r["lift"] = float(found.group(1)) if found else None
        r["id"] = q["id"]
        r["top_score"] = r["sources"][0].score if r["sources"] else 0.0
        r["answerable"] = q["document"] is not None
        answerable = q["document"] is not None
        r["correct"] = answerable and not r["abstained"] and is_right(r["answer"], q)
        cited = [s for s in r["sources"] if s.number in r["citations"]]
        r["cited_right"] = sum(holds_answer(s, q) for s in cited) if answerable else 0
        r["cited"] = len(cited) if answerable else 0
        r["answer_in_sources"] = answerable and any(holds_answer(s, q) for s in r["sources"])
        rows.append(r)
        if verbose:
            mark = "ABST" if r["abstained"] else ("ok  " if r["correct"] else "--  ")
            print(f"  [{name}] {i + 1:>3} {mark} {q['id']} {q['question'][:60]!r} → {r['answer'][:110]!r}", flush=True)
    answerable = [r for q, r in zip(questions, rows) if q["document"] is not None]
    unanswerable = [r for q, r in zip(questions, rows) if q["document"] is None]
    cited = sum(r["cited"] for r in answerable)
    figures = {
        "accuracy": _share(sum(r["correct"] for r in answerable), len(answerable)),
        "citation_precision": _share(sum(r["cited_right"] for r in answerable), cited),
        "abstention_unanswerable": _share(sum(r["abstained"] for r in unanswerable), len(unanswerable)),
        "false_abstention": _share(sum(r["abstained"] for r in answerable), len(answerable)),
        "extractive": _share(sum(r["extractive"] for r in answerable), len(answerable)),
        "answer_in_sources": _share(sum(r["answer_in_sources"] for r in answerable), len(answerable)),
        "ttft_p50_ms": round(statistics.median(r["ttft_ms"] for r in rows), 1),
        "ttft_p90_ms": round(percentile([r["ttft_ms"] for r in rows], 90), 1),
        "total_p50_ms": round(statistics.median(r["total_ms"] for r in rows), 1),
    }
    return figures, rows


def lift_curve(questions: list[dict], rows: list[dict], thresholds=(0, 2, 3, 4, 5, 6, 7, 8, 10)) -> dict:
    """Accuracy, false abstention and abstention on unanswerable questions had the ask abstained below each
    lift threshold (rows from the lift-curve configuration)."""
    curve = {}
    for t in thresholds:
        gated = [r["lift"] is not None and r["lift"] < t and not r["abstained"] for r in rows]
        ans = [(r, g) for q, r, g in zip(questions, rows, gated) if q["document"] is not None]
        unans = [(r, g) for q, r, g in zip(questions, rows, gated) if q["document"] is None]
        curve[str(t)] = {"accuracy": _share(sum(r["correct"] and not g for r, g in ans), len(ans)),
                         "false_abstention": _share(sum(r["abstained"] or g for r, g in ans), len(ans)),
                         "abstention_unanswerable": _share(sum(r["abstained"] or g for r, g in unans), len(unans))}
    return curve


def _share(n: int, d: int) -> float:
    return round(n / d, 4) if d else 0.0


def extra_router(mesh: LocalMesh, name: str, flags: list[str], data: Path, generator: str | None = None) -> Child:
    """One more router over the mesh's services, with `flags` on top of the mesh router's own."""
    base = mesh.child("router")
    port = free_port_block(1)
    argv = list(base.argv)
    argv[argv.index("--port") + 1] = str(port)
    if generator:
        argv[argv.index("--generator") + 1] = generator
    return Child(f"router-{name}", f"127.0.0.1:{port}", argv + flags, data / "logs" / f"router-{name}.log")


def extra_generator(mesh: LocalMesh, model_path: str, data: Path) -> Child:
    base = mesh.child("generator")
    port = free_port_block(1)
    argv = list(base.argv)
    argv[argv.index("--port") + 1] = str(port)
    return Child("generator-model", f"127.0.0.1:{port}", argv + ["--model-path", model_path],
                 data / "logs" / "generator-model.log")


def run(args: argparse.Namespace) -> None:
    if args.set == "prose":
        pages, questions = load_prose()
    else:
        pages, questions = corpus.load(), load_questions()
    if args.limit:
        answerable = [q for q in questions if q["document"]][: args.limit]
        unanswerable = [q for q in questions if not q["document"]][: max(1, args.limit // 4)]
        questions = answerable + unanswerable
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS and n != "model"]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {', '.join([*CONFIGS, 'model'])}")
    if args.model_path and "model" not in names:
        names.append("model")
    results, all_rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(Path(tmp), shards=2) as mesh:
        data = Path(tmp)
        ingest(router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.router)), pages)
        print(f"ingested {len(pages)} {args.set} documents; {len(questions)} questions; configurations: {', '.join(names)}",
              file=sys.stderr)
        for name in names:
            children = []
            if name == "model":
                if not args.model_path:
                    raise SystemExit("the 'model' configuration needs --model-path")
                gen = extra_generator(mesh, args.model_path, data)
                children.append(gen)
                children.append(extra_router(mesh, name, [], data, generator=gen.address))
            else:
                children.append(extra_router(mesh, name, CONFIGS[name], data))
            for child in children:
                start_child(child)
            try:
                asyncio.run(wait_ready(children, 300, quiet=True))
                stub = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(children[-1].address))
                ask(stub, "warm-up: what does ls do?")
                log = children[-1].log_path if "--log-level" in CONFIGS.get(name, []) else None
                results[name], all_rows[name] = evaluate(stub, questions, name, args.verbose, log)
                if name == "lift-curve":
                    results[name]["by_threshold"] = lift_curve(questions, all_rows[name])
            finally:
                stop_all(children)
            print(f"{name:>10}: {results[name]}", file=sys.stderr, flush=True)

    print(f"\n{'configuration':>13} {'accuracy':>8} {'cite-prec':>9} {'abstain':>7} {'false-abst':>10} "
          f"{'quoted':>6} {'TTFT p50':>9} {'total p50':>9}")
    for name, f in results.items():
        print(f"{name:>13} {f['accuracy']:>8.1%} {f['citation_precision']:>9.1%} {f['abstention_unanswerable']:>7.1%} "
              f"{f['false_abstention']:>10.1%} {f['extractive']:>6.1%} {f['ttft_p50_ms']:>7.0f}ms {f['total_p50_ms']:>7.0f}ms")
    figures: dict = {"set": args.set, "questions": len(questions), "answerable": sum(1 for q in questions if q["document"]),
                     "baseline": "today", "configurations": results}
    if "today" in results and "default" in results:
        figures["accuracy_gain_points"] = round(100 * (results["default"]["accuracy"] - results["today"]["accuracy"]), 1)
        figures["citation_precision_gain_points"] = round(
            100 * (results["default"]["citation_precision"] - results["today"]["citation_precision"]), 1)
    if args.dump:
        Path(args.dump).write_text(json.dumps({n: [{k: v for k, v in r.items() if k != "sources"} for r in rows]
                                               for n, rows in all_rows.items()}, indent=1))
    print(json.dumps(figures))


# ---- fitting ---------------------------------------------------------------------------------------


def fit(args: argparse.Namespace) -> None:
    """Fits the reranker's weights and the abstention threshold on the labelled set, in process (no mesh):
    candidates as the router gets them (dense over title-prefixed chunks + BM25, fused by reciprocal rank,
    12 of them, each method's best 3 among them), features by the embedder's own scorer, a grid over the
    weights, two folds by page.
    Also compares fp32 with int8 retrieval quality (nDCG@10 of dense search over the same chunks)."""
    import numpy as np

    from embedder import rerank
    from embedder.model import OnnxEmbedder
    from embedder.server import resolve_model
    from fabric.text import content_words
    from router.chunking import Chunker
    from router.config import RagConfig
    from router.domain import Hit
    from router.parsing import normalise_whitespace, title_for
    from router.retrieval import fuse_reciprocal_rank
    from router.server import _packaged_tokenizer

    questions = load_questions()
    pages = corpus.load()
    chunker = Chunker.from_file(_packaged_tokenizer())
    chunks = [(name, text) for name, page in pages.items() for text in chunker.split(normalise_whitespace(page))]
    titles = [title_for(f"{name}.txt") for name, _ in chunks]
    titled = [f"{t}: {text}" for t, (_, text) in zip(titles, chunks)]
    print(f"{len(chunks)} chunks from {len(pages)} pages", file=sys.stderr)
    answerable = [q for q in questions if q["document"]]
    figures: dict = {"chunks": len(chunks)}

    def relevant(q, i):
        return chunks[i][0] == q["document"] and normalise(q["evidence"]) in normalise(chunks[i][1])

    vectors = {}
    for variant in ("minilm", "minilm-int8"):
        model = OnnxEmbedder(resolve_model(variant))
        vectors[variant] = (model, model.embed(titled).vectors)
        queries = model.embed([q["question"] for q in answerable]).vectors
        ndcg = []
        for q, v in zip(answerable, queries):
            order = np.argsort(-(vectors[variant][1] @ v))[:10]
            ndcg.append(min(1.0, sum(1 / math.log2(r + 2) for r, i in enumerate(order) if relevant(q, i))))
        figures[f"{variant}_ndcg@10"] = round(statistics.mean(ndcg), 4)
    figures["int8_minus_fp32_ndcg@10"] = round(figures["minilm-int8_ndcg@10"] - figures["minilm_ndcg@10"], 4)

    model, chunk_vectors = vectors[args.fit_model]
    bags = [Counter(content_words(t)) for t in titled]
    df = Counter(w for bag in bags for w in bag)
    mean_length = sum(sum(b.values()) for b in bags) / len(bags)

    def bm25(query):
        terms = set(content_words(query))
        scores = np.zeros(len(bags))
        for j, bag in enumerate(bags):
            norm = 1.2 * (0.25 + 0.75 * sum(bag.values()) / mean_length)
            for t in terms & bag.keys():
                idf = math.log(1 + (len(bags) - df[t] + 0.5) / (df[t] + 0.5))
                scores[j] += idf * bag[t] * 2.2 / (bag[t] + norm)
        return scores

    async def embed(texts):
        return model.embed(texts).vectors

    cases = []
    for n, q in enumerate(questions):
        v = model.embed([q["question"]]).vectors[0]
        rankings = [[Hit(0.0, chunks[i][0], str(int(i)), "", "", 0) for i in ranking[:40]]
                    for ranking in (np.argsort(-(chunk_vectors @ v)), np.argsort(-bm25(q["question"])))]
        order = [int(h.chunk_id) for h in fuse_reciprocal_rank(rankings, 12, RagConfig.rerank_reserved)[:12]]
        texts = [chunks[i][1] for i in order]
        f = asyncio.run(rerank.features(q["question"], texts, embed, [titles[i] for i in order]))
        cases.append((q, texts, [chunks[i][0] for i in order], f))
        print(f"\rfeatures {n + 1}/{len(questions)}", end="", file=sys.stderr)
    print(file=sys.stderr)

    def evaluate(weights: rerank.Weights, subset) -> tuple[float, list[float], list[float]]:
        """Share of answerable questions whose best sentence (of the best passage) holds the answer, and the
        relevance the router's abstention reads (the best of the sources') of the answerable and the others."""
        hits, good, bad = 0, [], []
        for q, texts, docs, f in subset:
            ranked = rerank.rank(f, len(texts), weights, spans_per_text=1)
            top = ranked[0]
            (bad if q["document"] is None else good).append(max(r.relevance for r in ranked[:RagConfig.ask_top_k]))
            if q["document"] is not None:
                sentence = texts[top.index][top.spans[0].start : top.spans[0].end]
                hits += docs[top.index] == q["document"] and bool(re.search(q["answer"], sentence, re.I))
        return hits / max(1, len(good)), good, bad

    grid = [rerank.Weights(1.0, lexical, context, typed) for lexical in (0.0, 0.2, 0.35, 0.5, 0.8)
            for context in (0.0, 0.25, 0.5) for typed in (0.0, 0.1, 0.2, 0.3, 0.45)]
    names = sorted(pages)
    held_out = []
    for fold in (set(names[0::2]), set(names[1::2])):
        train = [c for c in cases if c[0]["document"] not in fold]
        test = [c for c in cases if c[0]["document"] in fold or c[0]["document"] is None]
        chosen = max(grid, key=lambda w: evaluate(w, train)[0])
        held_out.append((chosen, evaluate(chosen, test)[0]))
    best = max(grid, key=lambda w: evaluate(w, cases)[0])
    hit1, good, bad = evaluate(best, cases)
    threshold = float(np.percentile(good, 8))  # about 8 % of answerable questions abstain
    figures.update({
        "fit_model": args.fit_model,
        "weights": vars(best),
        "best_sentence_hit@1": round(hit1, 4),
        "best_sentence_hit@1_dense_only": round(evaluate(rerank.Weights(1.0, 0.0, 0.0, 0.0), cases)[0], 4),
        "best_sentence_hit@1_shipped_weights": round(evaluate(rerank.Weights(), cases)[0], 4),
        "held_out_hit@1": [round(h, 4) for _, h in held_out],
        "held_out_weights": [vars(w) for w, _ in held_out],
        "abstain_below_in_process": round(threshold, 4),
        "abstention_at_threshold": round(sum(s < threshold for s in bad) / max(1, len(bad)), 4),
        "false_abstention_at_threshold": round(sum(s < threshold for s in good) / max(1, len(good)), 4),
    })
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="today,default,no-rerank,no-verify,passages",
                        help="comma-separated configurations to run (default: all but 'model')")
    parser.add_argument("--limit", type=int, default=0, help="only the first N answerable questions (and N/4 others)")
    parser.add_argument("--set", choices=("man", "prose"), default="man",
                        help="the labelled set: man pages (with unanswerable questions) or the prose documents")
    parser.add_argument("--model-path", default="", help="a GGUF model: adds the 'model' configuration")
    parser.add_argument("--verbose", action="store_true", help="print every answer")
    parser.add_argument("--dump", default="", help="write every answer of every configuration to this JSON file")
    parser.add_argument("--fit", action="store_true", help="fit the reranker weights and abstention threshold instead")
    parser.add_argument("--fit-model", default="minilm-int8", help="embedder variant the fit uses")
    args = parser.parse_args()
    fit(args) if args.fit else run(args)


if __name__ == "__main__":
    main()
