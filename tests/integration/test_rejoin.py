"""A shard or replica that reports SERVING again is searched again within 2 s: the router watches each
replica's health (not a fixed ejection period), and its channels reconnect within about a second (not
gRPC's default backoff, which grows to 120 s)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from mesh.launcher import start_child
from tests.support.mesh import LocalMesh
from tests.support.waiting import until
from ragloom.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

REJOIN_S = 2.0
#: How long a shard stays down: long enough for gRPC's default reconnect backoff (1 s × 1.6 per attempt,
#: ±20 %) to have grown past several seconds, so a channel without a short backoff is caught out.
DOWN_S = 20.0
QUERIES = ["bees and hives", "lighthouse lamps", "tides and the moon", "glass furnaces"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = LocalMesh(tmp_path_factory.mktemp("rejoin"), shards=2, replicas=2, metrics=True)
    # Ejected replicas stay out far longer than the test waits: only their health can bring them back in time.
    m.child("router").argv += ["--eject-for-s", "60"]
    with m:
        with grpc.insecure_channel(m.router) as channel:
            topics = ["bees and hives", "lighthouse lamps and wicks", "tides and the moon", "glass furnaces"]
            docs = [router_pb2.Document(id=f"note-{i}", text=f"Note {i} about {topics[i % 4]}, and more about "
                                                             f"{topics[(i + 1) % 4]}.") for i in range(12)]
            router_pb2_grpc.RouterServiceStub(channel).Ingest(router_pb2.IngestRequest(documents=docs), timeout=120)
        yield m


async def serving(address: str) -> bool:
    """One health check on a fresh channel (no reconnect backoff carried over from earlier attempts)."""
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def first_serving(addresses: list[str], timeout_s: float) -> float:
    """The time (monotonic) at which the first of `addresses` is seen SERVING, polled every 20 ms."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        checks = await asyncio.gather(*(serving(a) for a in addresses))
        if any(checks):
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"none of {addresses} SERVING after {timeout_s:.0f} s")


def kill(mesh, names: list[str]) -> None:
    for name in names:
        mesh.child(name).process.kill()
    for name in names:
        mesh.child(name).process.wait()


def indexer_searches(mesh, name: str) -> float:
    """Searches (dense and lexical) the replica has answered since it started, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.child(name).metrics_port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "ragloom_grpc_server_handled_total" and s.labels.get("method", "").endswith("Search"))


class Load:
    """Searches against the router back to back, recording when each ended and whether it was complete."""

    def __init__(self, router: str):
        self.router = router
        self.results: list[tuple[float, bool]] = []  # (end, complete)
        self.errors: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.router) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            n = 0
            while not self._stop.is_set():
                try:
                    reply = await stub.Search(router_pb2.SearchRequest(query=QUERIES[n % 4], top_k=5), timeout=10)
                    self.results.append((time.monotonic(), not reply.coverage.partial))
                except grpc.aio.AioRpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                n += 1
                await asyncio.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()

    def partial_since(self, t: float) -> bool:
        return any(end > t and not complete for end, complete in self.results)

    def complete_again(self, after: float, run: int = 5) -> float | None:
        """End of the first of `run` complete searches in a row, all ended after `after`."""
        streak: list[float] = []
        for end, complete in self.results:
            if end <= after:
                continue
            streak = streak + [end] if complete else []
            if len(streak) == run:
                return streak[0]
        return None


def test_a_shard_that_comes_back_is_searched_within_2s_of_serving(mesh):
    names = ["indexer-1-r0", "indexer-1-r1"]

    async def scenario() -> float:
        load = Load(mesh.router)
        task = asyncio.create_task(load.run())
        try:
            await until(lambda: load.complete_again(0.0) is not None or task.done(), 30, "complete searches first")
            killed = time.monotonic()
            await asyncio.to_thread(kill, mesh, names)
            await until(lambda: load.partial_since(killed) or task.done(), 10, "partial results with shard 1 down")
            await asyncio.sleep(max(0.0, DOWN_S - (time.monotonic() - killed)))
            assert load.results[-1][1] is False, "shard 1 is down: results must be partial"
            for name in names:
                start_child(mesh.child(name))
            up = await first_serving([mesh.child(n).address for n in names], 60)
            await until(lambda: load.complete_again(up) is not None or task.done(), 15,
                        "complete searches again after shard 1 reported SERVING")
            return load.complete_again(up) - up
        finally:
            load.stop()
            await task
            assert not load.errors, load.errors[:5]

    rejoin = asyncio.run(scenario())
    print(f"\nshard rejoin: complete results {rejoin:.3f} s after it reported SERVING")
    assert rejoin < REJOIN_S


def test_a_replica_that_comes_back_takes_searches_within_2s_of_serving(mesh):
    name, other = "indexer-0-r0", "indexer-0-r1"

    async def scenario() -> float:
        load = Load(mesh.router)
        task = asyncio.create_task(load.run())
        try:
            await until(lambda: load.complete_again(0.0) is not None or task.done(), 30, "complete searches first")
            await asyncio.to_thread(kill, mesh, [name])
            served_before = await asyncio.to_thread(indexer_searches, mesh, other)
            # The router fails over to r1, and ejects r0 (its calls and its health stream fail).
            await until(lambda: indexer_searches(mesh, other) >= served_before + 20 or task.done(), 20,
                        "searches failed over to the other replica")
            start_child(mesh.child(name))
            up = await first_serving([mesh.child(name).address], 60)
            used = None
            while time.monotonic() < up + 10 and not task.done():
                if await asyncio.to_thread(indexer_searches, mesh, name) > 0:
                    used = time.monotonic()
                    break
                await asyncio.sleep(0.02)
            assert used is not None, f"{name} took no search in the 10 s after it reported SERVING"
            return used - up
        finally:
            load.stop()
            await task
            assert not load.errors, load.errors[:5]
            assert all(complete for _, complete in load.results), "a replica down must cost no result"

    rejoin = asyncio.run(scenario())
    print(f"\nreplica rejoin: searched {rejoin:.3f} s after it reported SERVING")
    assert rejoin < REJOIN_S
