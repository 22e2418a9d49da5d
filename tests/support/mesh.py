"""The whole mesh as child processes on free loopback ports: what integration tests and benchmarks
start and stop. It runs what `ragloom up` runs (the same MeshSpec, plan and launcher)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mesh.launcher import Child, Plan, plan, prepare, start_all, start_child, stop_all, wait_ready
from mesh.spec import FIXED_PORTS, MeshSpec
from tests.support.ports import free_port_block


class LocalMesh:
    """`with LocalMesh(tmp_path, shards=2) as mesh:` — started, SERVING, and stopped on exit.

    Keyword arguments are MeshSpec fields; ports are picked free, and the gateway, mTLS and
    authentication are off unless asked for (most tests talk to the router directly).
    """

    def __init__(self, data_dir: Path, *, metrics: bool = False, **fields):
        fields.setdefault("gateway", False)
        fields.setdefault("mtls", False)
        fields.setdefault("auth", False)
        shards, replicas = fields.get("shards", 2), fields.get("replicas", 1)
        base = free_port_block(shards * replicas + FIXED_PORTS + 1)
        fields.setdefault("router_port", base)
        fields.setdefault("base_port", base + 1)
        if metrics:
            fields.setdefault("metrics_base_port", free_port_block(shards * replicas + 4))
        self.spec = MeshSpec(data_dir=Path(data_dir), **fields)
        self.spec.validate()
        self.plan: Plan = plan(self.spec)
        self.children = self.plan.children

    @property
    def router(self) -> str:
        """The public endpoint: the gateway when there is one, else the router."""
        return self.plan.public.address

    def child(self, name: str) -> Child:
        return self.plan.child(name)

    def start(self) -> None:
        prepare(self.plan)
        try:
            start_all(self.children, self.spec.startup_timeout_s, quiet=True)
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
        start_child(child)
        asyncio.run(wait_ready([child], 120, quiet=True))

    def stop(self) -> None:
        stop_all(self.children)

    def __enter__(self) -> "LocalMesh":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
