"""A real nats-server with JetStream on free loopback ports, its store in the test's folder."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from fabric.probe import http_ready
from mesh.launcher import nats_server_binary, nats_server_config
from tests.support.ports import free_port_block


class NatsProcess:
    def __init__(self, folder: Path, max_payload: str = "8MB"):
        self.folder = Path(folder)
        self.port = free_port_block(2)
        self.monitor_port = self.port + 1
        self.url = f"nats://127.0.0.1:{self.port}"
        path, text = nats_server_config(self.folder, "127.0.0.1", self.port, self.monitor_port, None)
        self.config = path
        self.text = text.replace("max_payload: 8MB", f"max_payload: {max_payload}")
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 15.0) -> "NatsProcess":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.text)
        log = open(self.folder / "nats.log", "ab")
        self.process = subprocess.Popen([nats_server_binary(), "-c", str(self.config)], stdout=log,
                                        stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if http_ready(url, 1.0):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"nats-server did not start: {(self.folder / 'nats.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class NatsCluster:
    """Three nats-servers with JetStream, clustered by routes on loopback: a Raft-replicated log."""

    def __init__(self, folder: Path, size: int = 3):
        base = free_port_block(3 * size)
        self.nodes: list[NatsProcess] = []
        routes = [f"nats-route://127.0.0.1:{base + 2 * size + i}" for i in range(size)]
        for i in range(size):
            node = NatsProcess.__new__(NatsProcess)
            node.folder = Path(folder) / f"n{i}"
            node.port, node.monitor_port = base + i, base + size + i
            node.url = f"nats://127.0.0.1:{node.port}"
            path, text = nats_server_config(node.folder, "127.0.0.1", node.port, node.monitor_port, None)
            node.config, node.process = path, None
            others = ", ".join(r for j, r in enumerate(routes) if j != i)
            node.text = text.replace("server_name: ragloom-", f"server_name: n{i}-") + (
                f"cluster {{\n  name: ragloom\n  listen: 127.0.0.1:{base + 2 * size + i}\n  routes: [{others}]\n}}\n")
            self.nodes.append(node)
        self.url = ",".join(node.url for node in self.nodes)

    def start(self) -> "NatsCluster":
        for node in self.nodes:
            node.process = None
        procs = []
        for node in self.nodes:  # all at once: JetStream waits for a meta leader
            node.folder.mkdir(parents=True, exist_ok=True)
            node.config.write_text(node.text)
            log = open(node.folder / "nats.log", "ab")
            node.process = subprocess.Popen([nats_server_binary(), "-c", str(node.config)], stdout=log,
                                            stderr=subprocess.STDOUT)
            log.close()
            procs.append(node)
        deadline = time.monotonic() + 30
        for node in procs:
            url = f"http://127.0.0.1:{node.monitor_port}/healthz?js-enabled-only=true"
            while not http_ready(url, 1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats node did not start: {(node.folder / 'nats.log').read_text()[-2000:]}")
                time.sleep(0.1)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
