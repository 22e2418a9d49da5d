"""Time to first token and tokens/s of the generator through gRPC, against the llama.cpp backend in-process.

Baseline: the llama.cpp backend (packaged SmolLM2-135M) driven in this process, no network.
Measured: the same backend behind `python -m mesh serve generator --port N --threads T` in a
separate process, called with streaming Generate over loopback gRPC (ready once
`fabric.client.wait_healthy` says SERVING). Both use the same RAG-like prompts (the router's prompt
shape: numbered passages from the bundled samples + a question, ~300–800 prompt tokens), the same
seed, temperature 0, stop sequences, max_tokens and thread count. Both are timed at the caller
with the same clock (generator.stats): TTFT is request → first text, tokens/s is completion tokens
over the whole request. One run; each prompt goes to both, alternating which goes first, so load
drift on a shared machine hits both alike. Target: gRPC ≥ 0.95× in-process tokens/s.

It also measures in-process tokens/s with 1 and with 2 llama.cpp threads (interleaved the same
way), with the load average around it, to choose the generator's default thread count.

With --parallel it also measures aggregate tokens/s of 4 requests at once on one context with one
thread, one context with two, and two contexts with one thread each (the generator's --parallel).

    .venv/bin/python bench/generator.py [--threads 1] [--rounds 2] [--max-tokens 128] [--no-thread-sweep]
                                        [--parallel | --only-parallel]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generator.backends import ChatMessage, Delta, Finished, GenerationParams  # noqa: E402
from generator.backends.llama_cpp import LlamaCppBackend, packaged_model_path  # noqa: E402
from generator.stats import GenerationClock, GenerationStats  # noqa: E402
from fabric.client import wait_healthy  # noqa: E402
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc  # noqa: E402
from router.prompt import STOP_SEQUENCES, Passage, build_messages  # noqa: E402

CONTEXT_TOKENS = 2048
SEED = 1234
# (sample document, question, prompt budget in tokens); passages from the other samples fill the rest.
QUESTIONS = [
    ("honeybees.md", "How many bees live in a healthy colony in midsummer, and how many lay eggs?", 300),
    ("lighthouse-keeping.txt", "What did a lighthouse keeper do each night?", 450),
    ("mount-everest.txt", "Why is climbing above 8,000 metres dangerous?", 600),
    ("photosynthesis.md", "What happens in the light-dependent reactions of photosynthesis?", 800),
]


def prompts(count_tokens) -> list[list[ChatMessage]]:
    """The router's prompt for each question: its document's paragraphs first, then the other samples'."""
    samples = {p.name: p for p in (ROOT / "router" / "samples").iterdir() if p.suffix in (".md", ".txt")}
    paragraphs = {
        name: [" ".join(block.split()) for block in path.read_text().split("\n\n") if len(block.split()) > 12]
        for name, path in samples.items()
    }
    built = []
    for name, question, budget in QUESTIONS:
        texts = paragraphs[name] + [t for other, ts in sorted(paragraphs.items()) if other != name for t in ts]
        passages = [Passage(i + 1, name, text) for i, text in enumerate(texts)]
        messages, _ = build_messages(question, passages, count_tokens, budget)
        built.append([ChatMessage(m["role"], m["content"]) for m in messages])
    return built


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


async def in_process(backend: LlamaCppBackend, params: GenerationParams) -> tuple[GenerationStats, str]:
    clock, text = GenerationClock(), []
    async for item in backend.stream(params):
        if isinstance(item, Delta):
            clock.saw_text()
            text.append(item.text)
        else:
            return clock.finish(item), "".join(text)
    raise RuntimeError("the stream ended without Finished")


async def through_grpc(stub, params: GenerationParams) -> tuple[GenerationStats, str]:
    request = generator_pb2.GenerateRequest(
        messages=[generator_pb2.Message(role=m.role, content=m.content) for m in params.messages],
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        stop=params.stop,
        seed=params.seed,
    )
    clock, text = GenerationClock(), []
    async for reply in stub.Generate(request, timeout=300):
        if reply.text:
            clock.saw_text()
            text.append(reply.text)
        if reply.HasField("usage"):
            finished = Finished("stop", reply.usage.prompt_tokens, reply.usage.completion_tokens)
            return clock.finish(finished), "".join(text)
    raise RuntimeError("the call ended without usage")


def summary(runs: list[GenerationStats]) -> dict:
    """Totals over all runs (tokens over seconds), so long replies weigh as much as they cost."""
    tokens = sum(r.completion_tokens for r in runs)
    decode_ms = sum(r.inter_token_latency_ms * (r.completion_tokens - 1) for r in runs if r.completion_tokens > 1)
    return {
        "ttft_ms_median": round(statistics.median(r.time_to_first_token_ms for r in runs), 1),
        "ttft_ms_mean": round(statistics.fmean(r.time_to_first_token_ms for r in runs), 1),
        "tokens_per_s": round(tokens / (sum(r.total_ms for r in runs) / 1000), 2),
        "decode_tokens_per_s": round(sum(r.completion_tokens - 1 for r in runs) / (decode_ms / 1000), 2),
        "inter_token_ms_mean": round(decode_ms / sum(r.completion_tokens - 1 for r in runs), 2),
        "completion_tokens": tokens,
    }


async def thread_sweep(all_params: list[GenerationParams], rounds: int) -> dict:
    """In-process tokens/s with 1 and 2 threads, interleaved per prompt."""
    backends = {threads: LlamaCppBackend(context_tokens=CONTEXT_TOKENS, threads=threads) for threads in (1, 2)}
    for backend in backends.values():
        await backend.start()
    runs: dict[int, list[GenerationStats]] = {threads: [] for threads in backends}
    load_before = load_average()
    try:
        for round_ in range(rounds):
            for i, params in enumerate(all_params):
                order = sorted(backends) if (round_ + i) % 2 == 0 else sorted(backends, reverse=True)
                for threads in order:
                    stats, _ = await in_process(backends[threads], params)
                    runs[threads].append(stats)
    finally:
        for backend in backends.values():
            await backend.close()
    figures = {f"threads_{threads}": summary(stats) for threads, stats in runs.items()}
    figures["load_average_1m"] = [load_before, load_average()]
    return figures


#: (contexts, threads each): how the generator may spend this machine's CPUs on concurrent requests.
LAYOUTS = ((1, 1), (1, 2), (2, 1))


async def parallel_sweep(all_params: list[GenerationParams], concurrency: int = 4) -> dict:
    """Aggregate completion tokens/s with `concurrency` requests at once, per layout of contexts × threads,
    the layouts taking turns prompt by prompt (the default of `--parallel` is chosen from this)."""
    import time

    backends = {layout: LlamaCppBackend(context_tokens=CONTEXT_TOKENS, threads=layout[1], parallel=layout[0])
                for layout in LAYOUTS}
    for backend in backends.values():
        await backend.start()
    tokens = {layout: 0 for layout in backends}
    seconds = {layout: 0.0 for layout in backends}
    load_before = load_average()
    try:
        for i, params in enumerate(all_params):
            order = list(backends) if i % 2 == 0 else list(reversed(backends))
            for layout in order:
                start = time.perf_counter()
                results = await asyncio.gather(*(in_process(backends[layout], params) for _ in range(concurrency)))
                seconds[layout] += time.perf_counter() - start
                tokens[layout] += sum(stats.completion_tokens for stats, _ in results)
    finally:
        for backend in backends.values():
            await backend.close()
    figures = {f"contexts_{c}_threads_{th}_tokens_per_s": round(tokens[(c, th)] / seconds[(c, th)], 1)
               for c, th in backends}
    figures["concurrency"] = concurrency
    figures["load_average_1m"] = [load_before, load_average()]
    return figures


async def run(args: argparse.Namespace) -> dict:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(packaged_model_path()), vocab_only=True, verbose=False)

    def count_tokens(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False))

    all_params = [
        GenerationParams(messages, args.max_tokens, temperature=0.0, stop=list(STOP_SEQUENCES), seed=SEED)
        for messages in prompts(count_tokens)
    ]

    port = free_port()
    target = f"127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mesh", "serve", "generator", "--port", str(port), "--threads", str(args.threads),
         "--context-tokens", str(CONTEXT_TOKENS), "--log-level", "WARNING"],
        cwd=ROOT,
    )
    backend = LlamaCppBackend(context_tokens=CONTEXT_TOKENS, threads=args.threads)
    try:
        await backend.start()
        await wait_healthy(target, timeout_s=120)
        load_before = load_average()
        runs: dict[str, list[GenerationStats]] = {"in_process": [], "grpc": []}
        prompt_tokens, same_text = [], True
        async with grpc.aio.insecure_channel(target) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            # Warm-up: one short call each (first-call allocations, the gRPC connection).
            warm = GenerationParams(all_params[0].messages, 4, temperature=0.0, seed=SEED)
            await in_process(backend, warm)
            await through_grpc(stub, warm)
            for round_ in range(args.rounds):
                for i, params in enumerate(all_params):
                    results = {}
                    order = ("in_process", "grpc") if (round_ + i) % 2 == 0 else ("grpc", "in_process")
                    for mode in order:
                        call = in_process(backend, params) if mode == "in_process" else through_grpc(stub, params)
                        results[mode] = await call
                        runs[mode].append(results[mode][0])
                    same_text &= results["in_process"][1] == results["grpc"][1]
                    if round_ == 0:
                        prompt_tokens.append(results["in_process"][0].prompt_tokens)
        load_after = load_average()
    finally:
        await backend.close()
        server.terminate()
        server.wait(timeout=30)

    baseline, measured = summary(runs["in_process"]), summary(runs["grpc"])
    ratio = measured["tokens_per_s"] / baseline["tokens_per_s"]
    figures = {
        "bench": "generator",
        "model": packaged_model_path().name,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "prompts": len(all_params),
        "prompt_tokens": prompt_tokens,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "baseline_in_process": baseline,
        "grpc": measured,
        "grpc_vs_in_process_tokens_per_s": round(ratio, 3),
        "grpc_vs_in_process_decode_tokens_per_s": round(
            measured["decode_tokens_per_s"] / baseline["decode_tokens_per_s"], 3
        ),
        "grpc_ttft_overhead_ms_median": round(measured["ttft_ms_median"] - baseline["ttft_ms_median"], 1),
        "target_ratio": 0.95,
        "meets_target": ratio >= 0.95,
        "same_text": same_text,
        "load_average_1m": [load_before, load_after],
    }
    if args.thread_sweep:
        figures["thread_sweep_in_process"] = await thread_sweep(all_params, rounds=1)
    if args.parallel_sweep:
        figures["parallel_sweep_in_process"] = await parallel_sweep(all_params)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads, both sides (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="reply length limit (default: %(default)s)")
    parser.add_argument("--no-thread-sweep", dest="thread_sweep", action="store_false",
                        help="skip the 1-vs-2-thread in-process comparison")
    parser.add_argument("--parallel", dest="parallel_sweep", action="store_true",
                        help="also measure 4 concurrent requests on 1 context × 1 thread, 1 × 2 and 2 contexts × 1")
    parser.add_argument("--only-parallel", action="store_true", help="measure only that (quick)")
    args = parser.parse_args()
    if args.only_parallel:
        figures = asyncio.run(_only_parallel(args))
        print(json.dumps(figures))
        return

    figures = asyncio.run(run(args))
    base, grpc_ = figures["baseline_in_process"], figures["grpc"]
    print(f"prompts of {figures['prompt_tokens']} tokens, {args.threads} thread(s), {args.rounds} round(s)")
    print(f"in-process: TTFT {base['ttft_ms_median']} ms, {base['tokens_per_s']} tokens/s "
          f"(decode {base['decode_tokens_per_s']}/s)")
    print(f"gRPC:       TTFT {grpc_['ttft_ms_median']} ms, {grpc_['tokens_per_s']} tokens/s "
          f"(decode {grpc_['decode_tokens_per_s']}/s) -> {figures['grpc_vs_in_process_tokens_per_s']}x "
          f"(target >= 0.95), same text: {figures['same_text']}")
    if "thread_sweep_in_process" in figures:
        sweep = figures["thread_sweep_in_process"]
        print(f"in-process threads=1: {sweep['threads_1']['tokens_per_s']} tokens/s, "
              f"threads=2: {sweep['threads_2']['tokens_per_s']} tokens/s (load {sweep['load_average_1m']})")
    print(json.dumps(figures))


async def _only_parallel(args: argparse.Namespace) -> dict:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(packaged_model_path()), vocab_only=True, verbose=False)
    all_params = [GenerationParams(messages, args.max_tokens, temperature=0.0, stop=list(STOP_SEQUENCES), seed=SEED)
                  for messages in prompts(lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=False)))]
    sweep = await parallel_sweep(all_params[: max(2, args.rounds * 2)])
    print("4 requests at once, aggregate tokens/s: " + ", ".join(f"{k}: {v}" for k, v in sweep.items()
                                                               if k.endswith("tokens_per_s")))
    return {"bench": "generator_parallel", **sweep}


if __name__ == "__main__":
    main()
