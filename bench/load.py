"""Asks under load: goodput at 1×, 2× and 4× the measured capacity, alone and mixed with searches.

Runs `ragloom up` (no gateway, no auth: the router and generator are what is measured) from this
checkout and, with --baseline-rev, from that revision in a git worktree, one after the other, with the
same sample documents, questions and phases. Baseline: the named revision (e.g. the commit before
per-kind admission and deadline shedding), measured in the same run.

Per mesh: capacity first — closed loops of 1, 2 and 4 callers asking for --capacity-s each; the most
asks per second completed is the capacity C (one ask's retrieval overlaps another's generation, so C is
more than 1 / the latency of one ask alone). Then, for each load
factor k in 1, 2, 4: asks arrive open-loop (Poisson, rate k·C: callers do not wait for each other),
each with a deadline of --deadline-s, for --phase-s; once alone and once beside --search-clients
closed-loop searchers. Every ask is a distinct question (numbered) and bypasses the answer cache, so
none shares another's generation.

Reported per phase: goodput (asks answered within their deadline, per minute), refused asks
(RESOURCE_EXHAUSTED) and how fast they were refused (p99), deadline misses, other errors, search
p50/p99, whether router and generator stayed SERVING (health polled every 0.5 s), and their peak RSS.
Goal: at 4× capacity, ask goodput ≥ 80 % of the 1× goodput; every refused ask refused in < 100 ms.

    .venv/bin/python bench/load.py [--baseline-rev REV] [--phase-s 60] [--deadline-s 15]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import percentile  # noqa: E402
from fabric.client import wait_healthy  # noqa: E402
from ragloom.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402
from tests.support.ports import free_port_block  # noqa: E402

SAMPLES = sorted((ROOT / "router" / "samples").iterdir())
QUESTIONS = [
    "How do honeybees tell each other where flowers are?", "What does the waggle dance encode?",
    "Who decoded the hieroglyphs on the Rosetta Stone?", "Which scripts are on the Rosetta Stone?",
    "How does a sourdough starter rise?", "What feeds a sourdough starter?",
    "How did Roman aqueducts carry water?", "What lit a lighthouse lamp before electricity?",
    "How does TCP react to congestion?", "What is the slow start threshold?",
    "Where does photosynthesis happen in a plant?", "What does photosynthesis produce?",
    "How high is Mount Everest?", "Who first climbed Mount Everest?",
]


class Mesh:
    """`ragloom up` of a checkout (this one, or a worktree of another revision) on free ports."""

    def __init__(self, checkout: Path, folder: Path):
        self.checkout, self.folder = checkout, folder
        base = free_port_block(16)
        self.router = f"127.0.0.1:{base}"
        env = dict(os.environ, PYTHONPATH=f"{checkout}{os.pathsep}{checkout / 'protos'}")
        env.pop("RAGLOOM_TOKEN", None)
        self.log = open(folder / "up.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mesh", "up", "--data-dir", str(folder / "data"), "--router-port", str(base),
             "--base-port", str(base + 1), "--no-gateway", "--no-mtls", "--no-auth"],
            cwd=checkout, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.generator = f"127.0.0.1:{base + 2}"

    async def start(self) -> None:
        await wait_healthy(self.router, timeout_s=300)
        await wait_healthy(self.generator, timeout_s=300)

    def pids(self) -> dict[str, int]:
        """The router's and generator's processes (children of `ragloom up`), for their RSS."""
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or not _parent_is(proc, self.process.pid):
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for name in ("router", "generator"):
                if b"serve" in argv and name.encode() in argv:
                    found[name] = int(proc.name)
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _parent_is(proc: Path, pid: int) -> bool:
    try:
        return int((proc / "stat").read_text().split(") ")[1].split()[1]) == pid
    except (OSError, IndexError, ValueError):
        return False


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def ask(stub, question: str, deadline_s: float) -> tuple[str, float]:
    """One ask: its outcome ('ok', 'refused', 'deadline', or the code name) and seconds it took."""
    start = time.perf_counter()
    try:
        await stub.Ask(router_pb2.AskRequest(question=question, max_tokens=64, no_cache=True), timeout=deadline_s)
        outcome = "ok"
    except grpc.aio.AioRpcError as exc:
        outcome = {grpc.StatusCode.RESOURCE_EXHAUSTED: "refused",
                   grpc.StatusCode.DEADLINE_EXCEEDED: "deadline"}.get(exc.code(), exc.code().name)
    return outcome, time.perf_counter() - start


_asked = iter(range(10**9))


def question(rng: random.Random) -> str:
    """A question about the samples, numbered so that no two asks share a generation (single flight)."""
    return f"{rng.choice(QUESTIONS)} (#{next(_asked)})"


async def capacity(stub, seconds: float) -> tuple[float, float]:
    """(mean seconds of one ask alone, most asks per second completed): closed loops of 1, 2 and 4 callers
    for `seconds` each; the best throughput is the capacity (retrieval overlaps another ask's generation)."""
    rng = random.Random(1)
    alone, best = [], 0.0
    for callers in (1, 2, 4):
        done, end = [0], time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < end:
                outcome, s = await ask(stub, question(rng), 120)
                if outcome == "ok":
                    done[0] += 1
                    if callers == 1:
                        alone.append(s)

        start = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(callers)))
        best = max(best, done[0] / (time.monotonic() - start))
    return statistics.mean(alone), best


async def phase(mesh: Mesh, stub, rate: float, seconds: float, deadline_s: float, searchers: int) -> dict:
    rng = random.Random(int(rate * 1000) + searchers)
    outcomes: list[tuple[str, float]] = []
    search_ms: list[float] = []
    serving, rss = [True], {"router": 0.0, "generator": 0.0}
    stop = asyncio.Event()

    async def search_loop(i: int) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                await stub.Search(router_pb2.SearchRequest(query=rng.choice(QUESTIONS), top_k=5), timeout=10)
                search_ms.append((time.perf_counter() - start) * 1000)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)

    async def watch() -> None:
        async with grpc.aio.insecure_channel(mesh.router) as r, grpc.aio.insecure_channel(mesh.generator) as g:
            checks = [health_pb2_grpc.HealthStub(r), health_pb2_grpc.HealthStub(g)]
            pids = mesh.pids()
            while not stop.is_set():
                for health in checks:
                    try:
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                        serving[0] &= reply.status == health_pb2.HealthCheckResponse.SERVING
                    except grpc.aio.AioRpcError:
                        serving[0] = False
                for name, pid in pids.items():
                    rss[name] = max(rss[name], rss_mb(pid))
                await asyncio.sleep(0.5)

    background = [asyncio.ensure_future(search_loop(i)) for i in range(searchers)] + [asyncio.ensure_future(watch())]
    asks = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        asks.append(asyncio.ensure_future(ask(stub, question(rng), deadline_s)))
        await asyncio.sleep(rng.expovariate(rate))
    outcomes = await asyncio.gather(*asks)
    stop.set()
    await asyncio.gather(*background, return_exceptions=True)
    counts = {}
    for outcome, _ in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    refused = [s * 1000 for o, s in outcomes if o == "refused"]
    return {
        "rate_per_s": round(rate, 3), "asks": len(outcomes),
        "goodput_per_min": round(counts.get("ok", 0) * 60 / seconds, 2),
        "outcomes": counts,
        "refused_p99_ms": round(percentile(refused, 99), 1) if refused else None,
        "refused_max_ms": round(max(refused), 1) if refused else None,
        "search_p50_ms": round(percentile(search_ms, 50), 1) if search_ms else None,
        "search_p99_ms": round(percentile(search_ms, 99), 1) if search_ms else None,
        "searches": len(search_ms), "serving_throughout": serving[0],
        "router_rss_mb": round(rss["router"], 1), "generator_rss_mb": round(rss["generator"], 1),
    }


async def measure(checkout: Path, label: str, args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"ragloom-load-{label}-"))
    mesh = Mesh(checkout, folder)
    try:
        await mesh.start()
        async with grpc.aio.insecure_channel(mesh.router) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            docs = [router_pb2.Document(source=p.name, content=p.read_bytes()) for p in SAMPLES]
            await stub.Ingest(router_pb2.IngestRequest(documents=docs), timeout=300)
            mean_s, per_s = await capacity(stub, args.capacity_s)
            result = {"ask_seconds_alone": round(mean_s, 2), "capacity_per_min": round(60 * per_s, 2), "phases": {}}
            print(f"[{label}] one ask alone: {mean_s:.2f} s; capacity {60 * per_s:.1f} asks/min", flush=True)
            for searchers in (0, args.search_clients) if args.search_clients else (0,):
                for k in args.factors:
                    name = f"{k}x" + ("_with_search" if searchers else "")
                    figures = await phase(mesh, stub, k * per_s, args.phase_s, args.deadline_s, searchers)
                    result["phases"][name] = figures
                    print(f"[{label}] {name}: {json.dumps(figures)}", flush=True)
        for alone, loaded in (("1x", "4x"), ("1x_with_search", "4x_with_search")):
            if alone not in result["phases"] or loaded not in result["phases"]:
                continue
            base = result["phases"][alone]["goodput_per_min"]
            result[f"goodput_{loaded}_vs_{alone}"] = round(result["phases"][loaded]["goodput_per_min"] / base, 3) \
                if base else None
        return result
    finally:
        mesh.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", default="", help="also measure this git revision (e.g. main before a change)")
    parser.add_argument("--phase-s", type=float, default=60.0, help="seconds per load phase (default: %(default)s)")
    parser.add_argument("--capacity-s", type=float, default=20.0,
                        help="seconds of each closed loop measuring capacity (default: %(default)s)")
    parser.add_argument("--deadline-s", type=float, default=15.0, help="each ask's deadline (default: %(default)s)")
    parser.add_argument("--search-clients", type=int, default=8,
                        help="closed-loop searchers in the mixed phases; 0 = no mixed phases")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4],
                        help="load factors, multiples of the measured capacity (default: 1 2 4)")
    args = parser.parse_args()

    figures = {"bench": "load", "phase_s": args.phase_s, "deadline_s": args.deadline_s,
               "search_clients": args.search_clients}
    worktree = None
    try:
        if args.baseline_rev:
            worktree = Path(tempfile.mkdtemp(prefix="ragloom-baseline-"))
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.baseline_rev], cwd=ROOT,
                           check=True, capture_output=True)
            figures["baseline_rev"] = args.baseline_rev
            figures["baseline"] = asyncio.run(measure(worktree, "baseline", args))
        figures["current"] = asyncio.run(measure(ROOT, "current", args))
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    current = figures["current"]
    refused = [p["refused_max_ms"] for p in current["phases"].values() if p["refused_max_ms"] is not None]
    figures["refused_max_ms"] = max(refused) if refused else None
    figures["meets_goal"] = bool((current.get("goodput_4x_vs_1x") or 0) >= 0.8 and (not refused or max(refused) < 100)
                                 and all(p["serving_throughout"] for p in current["phases"].values()))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
