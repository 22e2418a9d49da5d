"""What tracing costs: Search throughput of the mesh with tracing on vs off, same run.

Three meshes (embedder, 2 shards, generator, router) run side by side on loopback: one with
tracing off (the baseline: no tracer provider, the OpenTelemetry API is a no-op), one tracing
at the default head-sampling ratio (10 % of requests), and one tracing every request, both
exporting over OTLP/gRPC to a local in-memory receiver. Both get the sample
documents; then rounds alternate between them, each round `--concurrency` clients calling
Search for `--seconds`. Query embeddings are cached after the first round, so the work per
call is the router, both shards and the gRPC hops — where tracing adds its spans.

Target: tracing (at the default sampling) costs ≤ 5 % of throughput.

    .venv/bin/python bench/tracing.py [--rounds 6] [--seconds 5] [--concurrency 8]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.mesh import LocalMesh  # noqa: E402
from tests.support.ports import free_port_block  # noqa: E402
from tests.support.spans import SpanSink  # noqa: E402
from ragloom.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402

QUERIES = [q["question"] for q in json.loads((ROOT / "tests" / "data" / "questions.json").read_text())]


async def throughput(address: str, seconds: float, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        end, done = time.monotonic() + seconds, 0

        async def client(i: int) -> None:
            nonlocal done
            n = i
            while time.monotonic() < end:
                await stub.Search(router_pb2.SearchRequest(query=QUERIES[n % len(QUERIES)], top_k=5), timeout=30)
                done += 1
                n += concurrency

        await asyncio.gather(*(client(i) for i in range(concurrency)))
        return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "500")
    with tempfile.TemporaryDirectory() as data, SpanSink(free_port_block(1)) as sink, \
            LocalMesh(Path(data) / "off", shards=2) as off, \
            LocalMesh(Path(data) / "on", shards=2, otlp_endpoint=sink.endpoint) as on:
        os.environ["RAGLOOM_TRACE_SAMPLE_RATIO"] = "1"
        every = LocalMesh(Path(data) / "every", shards=2, otlp_endpoint=sink.endpoint)
        every.start()
        del os.environ["RAGLOOM_TRACE_SAMPLE_RATIO"]
        meshes = (("off", off), ("on", on), ("every", every))
        samples = sorted((ROOT / "router" / "samples").iterdir())
        for _, mesh in meshes:
            with grpc.insecure_channel(mesh.router) as channel:
                docs = [router_pb2.Document(source=str(p), content=p.read_bytes()) for p in samples]
                router_pb2_grpc.RouterServiceStub(channel).Ingest(router_pb2.IngestRequest(documents=docs), timeout=120)
            asyncio.run(throughput(mesh.router, 2, args.concurrency))  # warm caches and connections
        rates = {name: [] for name, _ in meshes}
        try:
            for round_ in range(args.rounds):
                # A different mesh goes first each round, so drift and position cost every mesh alike.
                for name, mesh in meshes[round_ % 3:] + meshes[:round_ % 3]:
                    rates[name].append(asyncio.run(throughput(mesh.router, args.seconds, args.concurrency)))
        finally:
            every.stop()
        time.sleep(1)
        spans = len(sink.spans)

    off_rate, on_rate, every_rate = (statistics.median(rates[n]) for n in ("off", "on", "every"))
    figures = {
        "baseline_tracing_off_searches_per_s": round(off_rate, 1),
        "tracing_default_sampling_searches_per_s": round(on_rate, 1),
        "tracing_every_request_searches_per_s": round(every_rate, 1),
        "default_sampling_vs_off": round(on_rate / off_rate, 3),
        "cost_percent_default_sampling": round(100 * (1 - on_rate / off_rate), 1),
        "cost_percent_every_request": round(100 * (1 - every_rate / off_rate), 1),
        "spans_exported": spans,
        "rates_per_round": {name: [round(r, 1) for r in values] for name, values in rates.items()},
        "rounds": args.rounds, "seconds_per_round": args.seconds, "concurrency": args.concurrency,
    }
    print(f"tracing off {off_rate:.1f}/s; sampled 10 % {on_rate:.1f}/s (costs {figures['cost_percent_default_sampling']} %, "
          f"target ≤ 5 %); every request {every_rate:.1f}/s (costs {figures['cost_percent_every_request']} %); "
          f"{spans} spans exported")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
