import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from fabric.client import Deadline
from fabric.errors import Unavailable
from fabric.server import CallInterceptor
from router.topology import Breaker, Replica, ShardGroup, parse_topology, watch_health


class FakeError(grpc.aio.AioRpcError):
    def __init__(self, code):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


class FakeClient:
    def __init__(self, name, fail=None, delay=0.0):
        self.target, self.fail, self.delay, self.calls = name, fail, delay, 0

    async def op(self):
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise FakeError(self.fail)
        return self.target

    async def close(self):
        pass


def group(*clients):
    return ShardGroup(0, [Replica(c, Breaker(eject_after=2, eject_for_s=0.2)) for c in clients])


async def test_read_fails_over_to_a_healthy_replica():
    down, up = FakeClient("down", grpc.StatusCode.UNAVAILABLE), FakeClient("up")
    g = group(down, up)
    results = [await g.read(lambda c: c.op(), Deadline(5)) for _ in range(6)]
    assert results == ["up"] * 6
    assert down.calls == 2, "after 2 failures the dead replica is ejected and costs nothing"


async def test_a_replica_only_behind_the_log_fails_over_but_is_never_ejected():
    behind, up = FakeClient("behind", grpc.StatusCode.ABORTED), FakeClient("up")
    g = group(behind, up)
    results = [await g.read(lambda c: c.op(), Deadline(5)) for _ in range(6)]
    assert results == ["up"] * 6 and behind.calls == 3  # asked every other time: it stays in the rotation
    assert g.replicas[0].breaker.available()


async def test_ejected_replica_is_probed_back():
    flaky, other = FakeClient("flaky", grpc.StatusCode.UNAVAILABLE), FakeClient("other")
    g = group(flaky, other)
    for _ in range(4):
        await g.read(lambda c: c.op(), Deadline(5))
    flaky.fail = None
    await asyncio.sleep(0.25)
    seen = {await g.read(lambda c: c.op(), Deadline(5)) for _ in range(4)}
    assert "flaky" in seen


async def test_caller_faults_are_not_failed_over():
    bad = FakeClient("a", grpc.StatusCode.INVALID_ARGUMENT)
    g = group(bad, FakeClient("b"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        for _ in range(2):
            await g.read(lambda c: c.op(), Deadline(5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_topology_parses():
    assert parse_topology(["a:1|a:2", "b:1"]) == [["a:1", "a:2"], ["b:1"]]
    with pytest.raises(ValueError):
        parse_topology(["a:1", "|"])


# Health watching: a fake health source stands in for grpc.health.v1 Health/Watch (no network).

END = object()


class FakeHealth:
    """Health streams the test drives: each call opens a new stream reading its own queue (True: SERVING,
    False: NOT_SERVING, an exception: the stream breaks with it, END: the stream ends)."""

    def __init__(self):
        self.streams: list[asyncio.Queue] = []

    def __call__(self):
        queue = asyncio.Queue()
        self.streams.append(queue)

        async def updates():
            while True:
                item = await queue.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        return updates()

    async def send(self, item, stream: int = -1):
        await until(lambda: len(self.streams) >= (stream + 1 if stream >= 0 else 1), 2, "a health stream opened")
        await self.streams[stream].put(item)


async def until(condition, timeout_s=2.0, what="condition"):
    end = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < end, f"{what}: not true after {timeout_s}s"
        await asyncio.sleep(0.005)


def watched(*clients, eject_for_s=60.0):
    """A group whose replicas stay ejected for a minute (longer than any test) unless their health says otherwise."""
    healths = [FakeHealth() for _ in clients]
    breakers = [Breaker(eject_after=2, eject_for_s=eject_for_s) for _ in clients]
    g = ShardGroup(0, [Replica(c, b, h) for c, b, h in zip(clients, breakers, healths)])
    return g, healths


async def eject(g, index):
    """Fails calls to replica `index` until its breaker ejects it."""
    replica = g.replicas[index]
    while replica.breaker.available():
        with pytest.raises(grpc.aio.AioRpcError):
            await replica.call(lambda c: c.op_failing())
    assert not replica.breaker.available()


class Flaky(FakeClient):
    async def op_failing(self):
        raise FakeError(grpc.StatusCode.UNAVAILABLE)


async def test_serving_puts_an_ejected_replica_back_at_once():
    back, other = Flaky("back"), Flaky("other")
    g, (health, _) = watched(back, other)
    await eject(g, 0)
    assert {await g.read(lambda c: c.op(), Deadline(5)) for _ in range(4)} == {"other"}
    g.start()
    try:
        await health.send(True)
        t0 = asyncio.get_running_loop().time()
        await until(lambda: g.replicas[0].breaker.available(), 1.0, "the SERVING replica available")
        assert asyncio.get_running_loop().time() - t0 < 0.1, "reset at once, not after the 60 s ejection"
        assert g.replicas[0].breaker.failures == 0
        assert "back" in {await g.read(lambda c: c.op(), Deadline(5)) for _ in range(4)}
    finally:
        await g.close()


async def test_not_serving_takes_a_replica_out_with_no_probe_until_serving():
    behind, other = Flaky("behind"), Flaky("other")
    g, (health, _) = watched(behind, other, eject_for_s=0.05)
    g.start()
    try:
        await health.send(True)
        await until(lambda: not g.replicas[0].breaker.held)
        await health.send(False)
        await until(lambda: not g.replicas[0].breaker.available(), 1.0, "the NOT_SERVING replica ejected")
        await asyncio.sleep(0.1)  # longer than eject_for_s: an ejection would be probed by now, a hold is not
        assert {await g.read(lambda c: c.op(), Deadline(5)) for _ in range(6)} == {"other"}
        assert behind.calls == 0
        # A call that still reaches it (say it is the shard's last replica) does not lift the hold either.
        await g.replicas[0].call(lambda c: c.op())
        assert not g.replicas[0].breaker.available()
        await health.send(True)
        await until(lambda: g.replicas[0].breaker.available(), 1.0, "the replica back once SERVING")
    finally:
        await g.close()


async def test_the_watcher_reconnects_after_the_stream_breaks():
    r = Flaky("r")
    g, (health, ) = watched(r)
    task = asyncio.create_task(g.replicas[0].watch(backoff_s=0.02, max_backoff_s=0.05))
    try:
        await health.send(True, stream=0)
        await until(lambda: g.replicas[0].breaker.available())
        await health.send(FakeError(grpc.StatusCode.UNAVAILABLE), stream=0)  # the replica went away
        await until(lambda: len(health.streams) == 2, 1.0, "the watch reopened")
        assert not g.replicas[0].breaker.available(), "a lost stream ejects the replica"
        await health.send(FakeError(grpc.StatusCode.UNAVAILABLE), stream=1)  # still down
        await until(lambda: len(health.streams) == 3, 1.0, "the watch reopened again")
        await health.send(END, stream=2)  # a stream that just ends is watched again too
        await until(lambda: len(health.streams) == 4, 1.0, "the watch reopened after the stream ended")
        await health.send(True, stream=3)  # back
        await until(lambda: g.replicas[0].breaker.available(), 1.0, "the replica back on the new stream")
        assert g.replicas[0].breaker.failures == 0 and not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_reconnect_backoff_is_short_and_bounded():
    r = Flaky("r")
    g, (health, ) = watched(r)
    task = asyncio.create_task(g.replicas[0].watch(backoff_s=0.01, max_backoff_s=0.04))
    try:
        opened = []
        for n in range(6):
            await health.send(FakeError(grpc.StatusCode.UNAVAILABLE), stream=n)
            await until(lambda: len(health.streams) == n + 2, 1.0, "the watch reopened")
            opened.append(asyncio.get_running_loop().time())
        gaps = [b - a for a, b in zip(opened, opened[1:])]
        assert max(gaps) < 0.2, gaps  # doubling from 0.01 s, never past 0.04 s (plus scheduling)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_watch_refused_for_another_reason_leaves_the_breaker_to_the_calls():
    r = Flaky("r")
    g, (health, ) = watched(r)
    task = asyncio.create_task(g.replicas[0].watch(backoff_s=0.01, max_backoff_s=0.02))
    try:
        await health.send(False, stream=0)
        await until(lambda: g.replicas[0].breaker.held)
        await health.send(FakeError(grpc.StatusCode.PERMISSION_DENIED), stream=0)
        await until(lambda: len(health.streams) == 2, 1.0, "the watch reopened")
        assert g.replicas[0].breaker.available(), "neither held nor ejected on what it can no longer vouch for"
        await health.send(FakeError(grpc.StatusCode.UNIMPLEMENTED), stream=1)  # no health service at all
        await asyncio.wait_for(task, 1.0)
        assert g.replicas[0].breaker.available() and len(health.streams) == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_start_watches_every_replica_once_and_close_stops_the_watchers():
    g, healths = watched(Flaky("a"), Flaky("b"))
    tasks = g.start()
    assert g.start() == tasks and len(tasks) == 2
    await until(lambda: all(h.streams for h in healths), 1.0, "both replicas watched")
    await g.close()
    assert all(t.done() for t in tasks)


def test_a_breaker_ejected_by_a_lost_stream_is_still_probed():
    b = Breaker(eject_after=2, eject_for_s=0.0)
    b.eject()
    assert b.failures == 2 and b.available()  # the ejection ran out: this call is the probe
    assert not b.available()  # one probe at a time
    b.success()
    assert b.available()


# The real health source, against in-process servers on loopback: Watch where the server relays it, Check
# polled where it does not (a stream interceptor that cannot relay Watch answers INTERNAL).


@pytest.fixture(params=["plain", "intercepted"])
async def health_server(request):
    interceptors = [CallInterceptor("indexer")] if request.param == "intercepted" else []
    server = grpc.aio.server(interceptors=interceptors)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    yield health, f"127.0.0.1:{port}"
    await server.stop(0)


# fabric.server's stream wrapper iterates Watch, which writes through its context instead: the warning is its.
@pytest.mark.filterwarnings("ignore:coroutine 'HealthServicer.Watch' was never awaited:RuntimeWarning")
async def test_watch_health_follows_a_real_health_service(health_server):
    health, address = health_server
    seen = []

    async def follow(updates):
        async for serving in updates:
            seen.append(serving)

    async with grpc.aio.insecure_channel(address) as ch:
        task = asyncio.create_task(follow(watch_health(ch, poll_s=0.02)()))
        try:
            await until(lambda: seen == [False], 2, "NOT_SERVING reported")
            await health.set("", health_pb2.HealthCheckResponse.SERVING)
            await until(lambda: seen == [False, True], 2, "SERVING reported")
            await asyncio.sleep(0.1)
            assert seen == [False, True], "changes only, as Watch reports them"
            await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await until(lambda: seen == [False, True, False], 2, "NOT_SERVING reported again")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
