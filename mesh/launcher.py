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
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mesh import policy
from mesh.client import wait_healthy
from mesh.gateway import Upstream, envoy_argv, envoy_config, write_config
from mesh.tls import Identity, LocalCA, spiffe_id


@dataclass
class Child:
    name: str
    address: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    #: Readiness: gRPC health on `address` (with this mTLS identity), or this HTTP URL (Envoy's /ready).
    identity: Identity | None = None
    ready_url: str = ""
    #: Port of its Prometheus /metrics, 0 when off.
    metrics_port: int = 0


def plan(args: argparse.Namespace) -> list[Child]:
    """The processes `ragloom up` runs, with their ports, flags and identities.

    Ports from --base-port: embedder, generator, router, canary router, gateway admin, then the
    shards' replicas. With the gateway on, Envoy takes --router-port (gRPC and REST) and the
    router listens on its internal port; without it, the router takes --router-port.
    """
    data, host, base = args.data_dir.expanduser().resolve(), args.host, args.base_port
    logs = data / "logs"
    serve = [sys.executable, "-m", "mesh", "serve"]
    gateway = getattr(args, "gateway", False)
    traffic = policy.load(*getattr(args, "values", []) or [])
    canary_weight = _canary_weight(args, traffic)
    embedder, generator = f"{host}:{base}", f"{host}:{base + 1}"
    router = f"{host}:{base + 2}" if gateway else f"{host}:{args.router_port}"
    router_canary = f"{host}:{base + 3}"
    admin_port = base + 4
    replicas = args.replicas
    # shards[s][r]: address of replica r of shard s
    shards = [[f"{host}:{base + 5 + s * replicas + r}" for r in range(replicas)] for s in range(args.shards)]

    ca = LocalCA(data / "pki") if getattr(args, "mtls", False) else None
    launcher_id = ca.issue("launcher", spiffe_id("launcher", traffic.namespace, traffic.trust_domain)) if ca else None

    def tls(service: str, name: str) -> tuple[list[str], Identity | None]:
        if ca is None:
            return [], None
        ident = ca.issue(name, traffic.spiffe_id(service))
        flags = ["--tls-cert", str(ident.cert), "--tls-key", str(ident.key), "--tls-ca", str(ident.ca)]
        allowed = traffic.allowed_spiffe_ids(service)
        if allowed:
            flags += ["--allowed-callers", ",".join(allowed)]
        return flags, ident

    metrics_ports = iter(range(getattr(args, "metrics_base_port", 0) or 0, 65536))
    otlp = getattr(args, "otlp_endpoint", "")

    def child(name: str, service: str, address: str, flags: list[str]) -> Child:
        tls_flags, _ = tls(service, name)
        argv = [*serve, service, "--host", host, "--port", address.rsplit(":", 1)[1], *flags, *tls_flags]
        metrics_port = 0
        if getattr(args, "metrics_base_port", 0):
            metrics_port = next(metrics_ports)
            argv += ["--metrics-port", str(metrics_port)]
        if otlp:
            argv += ["--otlp-endpoint", otlp]
        return Child(name, address, argv, logs / f"{name}.log", identity=launcher_id, metrics_port=metrics_port)

    children = [child("embedder", "embedder", embedder, [])]
    gen_flags = ["--backend", args.generator_backend]
    if getattr(args, "generator_model_path", ""):
        gen_flags += ["--model-path", args.generator_model_path]
    if args.openai_base_url:
        gen_flags += ["--openai-base-url", args.openai_base_url]
    if args.openai_model:
        gen_flags += ["--openai-model", args.openai_model]
    children.append(child("generator", "generator", generator, gen_flags))
    for s, group in enumerate(shards):
        for r, address in enumerate(group):
            suffix = f"{s}" if replicas == 1 else f"{s}-r{r}"
            flags = ["--shard-id", str(s), "--data-dir", str(data / f"shard-{suffix}")]
            peers = [a for a in group if a != address]
            if peers:
                flags += ["--peers", ",".join(peers)]
            children.append(child(f"indexer-{suffix}", "indexer", address, flags))
    router_flags = ["--embedder", embedder, "--generator", generator, "--indexers", ",".join("|".join(g) for g in shards)]
    if args.redis_url:
        router_flags += ["--redis-url", args.redis_url]
    children.append(child("router", "router", router, router_flags))
    if gateway and canary_weight:
        children.append(child("router-canary", "router", router_canary, router_flags))
    if gateway:
        gateway_id = ca.issue("gateway", traffic.spiffe_id(policy.GATEWAY)) if ca else None
        config = envoy_config(
            traffic, listen_host=host, listen_port=args.router_port, admin_port=admin_port,
            stable=Upstream("stable", host, int(router.rsplit(":", 1)[1])),
            canary=Upstream("canary", host, base + 3) if canary_weight else None,
            identity=gateway_id, canary_weight=canary_weight,
        )
        path = write_config(config, data / "gateway" / "envoy.json")
        children.append(Child("gateway", f"{host}:{args.router_port}", envoy_argv(path, base_id=admin_port),
                              logs / "gateway.log", ready_url=f"http://127.0.0.1:{admin_port}/ready"))
    return children


def _canary_weight(args: argparse.Namespace, traffic: policy.TrafficPolicy) -> int:
    """Percent of traffic for the canary router: --canary-weight, else the values' router canary."""
    explicit = getattr(args, "canary_weight", None)
    if explicit is not None:
        if not 0 <= explicit <= 100:
            raise ValueError("--canary-weight must be between 0 and 100")
        return explicit
    route = traffic.route("router")
    return route.canary_weight if route.canary else 0


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


async def _wait_http_ready(url: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=1).read())
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


async def _wait_ready(children: list[Child], timeout_s: float, quiet: bool = False) -> None:
    async def one(child: Child) -> None:
        if child.ready_url:
            task = asyncio.ensure_future(_wait_http_ready(child.ready_url, timeout_s))
        else:
            task = asyncio.ensure_future(wait_healthy(child.address, timeout_s, identity=child.identity))
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
                 redis_url: str = "", gateway: bool = False, mtls: bool = False, canary_weight: int | None = None,
                 metrics: bool = False, otlp_endpoint: str = ""):
        base = free_port_block(shards * replicas + 6)
        metrics_base = free_port_block(shards * replicas + 4) if metrics else 0
        self.args = argparse.Namespace(
            data_dir=Path(data_dir), shards=shards, replicas=replicas, host="127.0.0.1", router_port=base,
            base_port=base + 1, generator_backend=generator_backend, openai_base_url="", openai_model="",
            redis_url=redis_url, startup_timeout=300.0, gateway=gateway, mtls=mtls, canary_weight=canary_weight,
            values=[], metrics_base_port=metrics_base, otlp_endpoint=otlp_endpoint,
        )
        self.children = plan(self.args)

    @property
    def router(self) -> str:
        """The public endpoint: the gateway when there is one, else the router."""
        return self.child("gateway" if self.args.gateway else "router").address

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
        asyncio.run(_wait_ready([child], 120, quiet=True))

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
    if args.mtls and not args.gateway:
        print("ragloom up: --mtls needs the gateway (only it may call the router); add --no-mtls with --no-gateway",
              file=sys.stderr)
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
        public = next(c for c in children if c.name == ("gateway" if args.gateway else "router")).address
        lines = ["", "ragloom is up.", f"  public API, gRPC: {public}"]
        if args.gateway:
            admin = next(c for c in children if c.name == "gateway").ready_url.rsplit("/", 1)[0]
            lines += [f"  public API, REST: http://{public}/v1/search  /v1/ask  /v1/documents",
                      f"  gateway admin:    {admin}/stats/prometheus"]
        lines.append(f"  mutual TLS:       {'on, CA in ' + str(data_dir / 'pki') if args.mtls else 'off'}")
        lines += ["  try: ragloom ingest --sample && ragloom ask \"How do honeybees tell each other where flowers are?\"",
                  f"  (clients find the API at {public}: the default, or --router / RAGLOOM_ROUTER)",
                  "Press Ctrl-C to stop."]
        print("\n".join(lines), flush=True)
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
