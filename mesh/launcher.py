"""`ragloom up`: the whole mesh as child processes on one machine, stopped together."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mesh.client import wait_healthy


@dataclass
class Child:
    name: str
    address: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None


def plan(args: argparse.Namespace) -> list[Child]:
    """The processes `ragloom up` runs, with their ports and flags."""
    data, host, base = args.data_dir.expanduser().resolve(), args.host, args.base_port
    logs = data / "logs"
    serve = [sys.executable, "-m", "mesh", "serve"]
    embedder = f"{host}:{base}"
    generator = f"{host}:{base + 1}"
    replicas = args.replicas
    # shards[s][r]: address of replica r of shard s
    shards = [[f"{host}:{base + 2 + s * replicas + r}" for r in range(replicas)] for s in range(args.shards)]
    children = [
        Child("embedder", embedder, [*serve, "embedder", "--host", host, "--port", str(base)], logs / "embedder.log"),
    ]
    gen_flags = ["--backend", args.generator_backend]
    if args.openai_base_url:
        gen_flags += ["--openai-base-url", args.openai_base_url]
    if args.openai_model:
        gen_flags += ["--openai-model", args.openai_model]
    children.append(Child("generator", generator, [*serve, "generator", "--host", host, "--port", str(base + 1), *gen_flags],
                          logs / "generator.log"))
    for s, group in enumerate(shards):
        for r, address in enumerate(group):
            suffix = f"{s}" if replicas == 1 else f"{s}-r{r}"
            argv = [*serve, "indexer", "--host", host, "--port", address.rsplit(":", 1)[1], "--shard-id", str(s),
                    "--data-dir", str(data / f"shard-{suffix}")]
            peers = [a for a in group if a != address]
            if peers:
                argv += ["--peers", ",".join(peers)]
            children.append(Child(f"indexer-{suffix}", address, argv, logs / f"indexer-{suffix}.log"))
    router_flags = ["--embedder", embedder, "--generator", generator, "--indexers", ",".join("|".join(g) for g in shards)]
    if args.redis_url:
        router_flags += ["--redis-url", args.redis_url]
    children.append(Child(
        "router", f"{host}:{args.router_port}",
        [*serve, "router", "--host", host, "--port", str(args.router_port), *router_flags],
        logs / "router.log",
    ))
    return children


def _start(child: Child) -> None:
    child.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(child.log_path, "ab")
    # Own process group: Ctrl-C in the terminal reaches the launcher only, which then stops children in order.
    child.process = subprocess.Popen(child.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
    log.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_all(children: list[Child], grace_s: float = 10.0) -> None:
    """SIGTERM every child (router first, so no new work arrives), then wait; SIGKILL what lingers."""
    running = [c for c in reversed(children) if c.process and c.process.poll() is None]
    for child in running:
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in running:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


async def _wait_ready(children: list[Child], timeout_s: float, quiet: bool = False) -> None:
    async def one(child: Child) -> None:
        task = asyncio.ensure_future(wait_healthy(child.address, timeout_s))
        while not task.done():
            if child.process.poll() is not None:
                task.cancel()
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}:\n{_tail(child.log_path)}")
            await asyncio.wait({task}, timeout=0.2)
        task.result()
        if not quiet:
            print(f"  {child.name:<11} SERVING  {child.address}", file=sys.stderr)

    await asyncio.gather(*(one(c) for c in children))


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """First of `count` consecutive ports free on `host` (for tests and benchmarks)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free block of ports")


class LocalMesh:
    """The mesh as child processes on free loopback ports: what tests and benchmarks start and stop."""

    def __init__(self, data_dir: Path, shards: int = 2, replicas: int = 1, generator_backend: str = "llama_cpp",
                 redis_url: str = ""):
        base = free_port_block(shards * replicas + 3)
        self.args = argparse.Namespace(
            data_dir=Path(data_dir), shards=shards, replicas=replicas, host="127.0.0.1", router_port=base,
            base_port=base + 1, generator_backend=generator_backend, openai_base_url="", openai_model="",
            redis_url=redis_url, startup_timeout=300.0,
        )
        self.children = plan(self.args)

    @property
    def router(self) -> str:
        return self.child("router").address

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start(self) -> None:
        for child in self.children:
            _start(child)
        try:
            asyncio.run(_wait_ready(self.children, self.args.startup_timeout, quiet=True))
        except BaseException:
            self.stop()
            raise

    def restart(self, name: str, kill: bool = True) -> None:
        """Stops one service (SIGKILL by default: no chance to flush anything) and starts it again."""
        child = self.child(name)
        if kill:
            child.process.kill()
            child.process.wait()
        else:
            stop_all([child])
        _start(child)
        asyncio.run(wait_healthy(child.address, 120))

    def stop(self) -> None:
        stop_all(self.children)

    def __enter__(self) -> "LocalMesh":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_up(args: argparse.Namespace) -> int:
    if args.shards < 1 or args.replicas < 1:
        print("ragloom up: --shards and --replicas must be at least 1", file=sys.stderr)
        return 2
    children = plan(args)
    data_dir = args.data_dir.expanduser().resolve()
    print(f"ragloom: starting the mesh (data in {data_dir}, logs in {data_dir / 'logs'})", file=sys.stderr)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for child in children:
            _start(child)
        try:
            asyncio.run(_wait_ready(children, args.startup_timeout))
        except (RuntimeError, TimeoutError) as exc:
            print(f"ragloom: the mesh did not start: {exc}", file=sys.stderr)
            return 1
        router = children[-1].address
        print(f"\nragloom is up.\n  public API (gRPC): {router}\n"
              f"  try: ragloom ingest --sample && ragloom ask \"How do honeybees tell each other where flowers are?\"\n"
              f"  (clients find the router at {router} by default, or through --router / RAGLOOM_ROUTER)\n"
              "Press Ctrl-C to stop.", flush=True)
        while stop["signal"] is None:
            for child in children:
                if child.process.poll() is not None:
                    print(f"ragloom: {child.name} exited with code {child.process.returncode}; stopping the mesh\n"
                          f"{_tail(child.log_path)}", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        print("ragloom: stopping…", file=sys.stderr)
        stop_all(children)
        for s, handler in previous.items():
            signal.signal(s, handler)
        print("ragloom: stopped", file=sys.stderr)
