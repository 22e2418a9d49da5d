"""Indexer shards as real processes on free loopback ports, for the durability and replica tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from mesh.launcher import Child, start_child, wait_ready
from tests.support.ports import free_port_block
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc

class ShardProcess:
    """`python -m mesh serve indexer` on a fixed port and data folder, started and killed at will."""

    def __init__(self, data_dir: Path, dimension: int, *flags: str, port: int | None = None):
        self.data_dir = data_dir
        self.port = port or free_port_block(1)
        self.address = f"127.0.0.1:{self.port}"
        self.argv = [
            sys.executable, "-m", "mesh", "serve", "indexer", "--port", str(self.port),
            "--data-dir", str(data_dir), "--dimension", str(dimension), "--grace-s", "1", *flags,
        ]
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._child = Child("indexer", self.address, self.argv, self.log_path)
        self._channel: grpc.aio.Channel | None = None

    @property
    def process(self) -> subprocess.Popen | None:
        return self._child.process

    async def start(self, timeout_s: float = 30.0) -> indexer_pb2_grpc.IndexerServiceStub:
        """Starts the process (as `ragloom up` starts its children) and waits until it reports SERVING."""
        start_child(self._child)
        await wait_ready([self._child], timeout_s, quiet=True)
        return self.stub()

    def stub(self) -> indexer_pb2_grpc.IndexerServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return indexer_pb2_grpc.IndexerServiceStub(self._channel)

    def kill(self) -> None:
        """SIGKILL: nothing gets flushed, closed or snapshotted."""
        self.process.kill()
        self.process.wait()

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM: a graceful shutdown (which takes a last snapshot)."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    async def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def unit_vectors(n: int, dimension: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dimension)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


async def nearest(stub, vectors: np.ndarray, k: int = 1, **request) -> list[list[str]]:
    """Chunk ids of the k nearest hits of each vector, through one batched Search."""
    reply = await stub.Search(
        indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=v) for v in vectors], k=k, ef=400, **request),
        timeout=30,
    )
    return [[h.chunk_id for h in result.hits] for result in reply.results]
