"""Starts the real mesh (embedder, 2 indexer shards, generator, router) as processes on free loopback ports."""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
from pathlib import Path

import pytest

from mesh.client import wait_healthy
from mesh.launcher import Child, _start, _wait_ready, plan, stop_all


def free_port_block(count: int) -> int:
    """First port of `count` consecutive ports that are free on 127.0.0.1."""
    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free block of ports")


class Mesh:
    def __init__(self, data_dir: Path, shards: int = 2):
        base = free_port_block(shards + 3)
        self.args = argparse.Namespace(
            data_dir=data_dir, shards=shards, host="127.0.0.1", router_port=base, base_port=base + 1,
            generator_backend="llama_cpp", openai_base_url="", openai_model="", startup_timeout=240.0,
        )
        self.children = plan(self.args)
        self.data_dir = data_dir

    @property
    def router(self) -> str:
        return self.child("router").address

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start(self) -> None:
        for child in self.children:
            _start(child)
        asyncio.run(_wait_ready(self.children, self.args.startup_timeout))

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


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    try:
        m.start()
        yield m
    finally:
        m.stop()
