import asyncio

import grpc
import pytest

from fabric.client import Deadline
from fabric.errors import Unavailable
from router.topology import Breaker, Replica, ShardGroup, parse_topology


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
