"""Shards and their replicas as the router sees them: failover reads, ejection, health watching.

A replica that fails `eject_after` calls in a row is ejected for `eject_for_s`: requests skip
it, so a dead replica costs nothing; after that one request probes it and a success brings it
back. Once `ShardGroup.start()` has run, each replica also has a health watcher (a
grpc.health.v1 Health/Watch stream on its own channel): SERVING puts it back in the rotation
at once, whatever the breaker said; NOT_SERVING (down, warming up, or behind its log and
catching up) takes it out, with no probes, until it reports SERVING again; a broken stream
ejects it as failures would, and the watcher reconnects within about a second. Reads go to one
replica (rotating) and fail over to the next within the request's deadline. Replicas follow
their shard's log, so the router never writes to them; only a standalone shard (one replica, no
log) is written directly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabric.client import Deadline
from fabric.errors import Unavailable, code_of, is_behind, is_caller_fault, is_dependency_failure
from router.clients import ShardClient

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A replica's health as a stream: True for each SERVING report, False for any other; it ends or raises
#: when the stream breaks. Made anew for each (re)connection.
HealthUpdates = Callable[[], AsyncIterator[bool]]


class Breaker:
    def __init__(self, eject_after: int = 3, eject_for_s: float = 5.0):
        self.eject_after = eject_after
        self.eject_for_s = eject_for_s
        self.failures = 0
        self.ejected_until = 0.0
        self._probing = False
        #: The replica's own health says it is not serving: skipped, and not probed, until it says it is.
        self.held = False

    def available(self) -> bool:
        """True when closed, or when the ejection has run out and no probe is under way (this call is the probe);
        never while the replica's health holds it out."""
        if self.held:
            return False
        if self.failures < self.eject_after:
            return True
        if time.monotonic() >= self.ejected_until and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self._probing = 0, False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.eject_after:
            self.ejected_until = time.monotonic() + self.eject_for_s

    def reset(self) -> None:
        """The replica reports SERVING: closed, at once, however it was ejected or held."""
        self.failures, self.ejected_until, self._probing, self.held = 0, 0.0, False, False

    def hold(self) -> None:
        """The replica reports it is not serving: skipped, with no probe, until `reset`."""
        self.held, self._probing = True, False

    def eject(self) -> None:
        """The replica's health is unknown (its stream broke): ejected as `eject_after` failures would, so a
        probe may still bring it back should its health stay unknown; an ejection under way is left as it is."""
        self.held = False
        if self.failures < self.eject_after:  # an ejection under way keeps its end (and its probe)
            self._probing = False
            self.failures = self.eject_after
            self.ejected_until = time.monotonic() + self.eject_for_s


#: Errors of a health stream that mean the replica is gone (down, unreachable, not answering).
_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def watch_health(ch: grpc.aio.Channel, service: str = "", poll_s: float = 0.25) -> HealthUpdates:
    """`HealthUpdates` from grpc.health.v1 on `ch`: Health/Watch, which waits for the channel to be ready
    (wait_for_ready), so a replica that is down is picked up as soon as the channel reconnects. A server
    that refuses Watch (not a lost connection: UNIMPLEMENTED, or INTERNAL from an interceptor that cannot
    relay it) is polled with Health/Check every `poll_s` instead, reporting changes only, as Watch does."""
    stub = health_pb2_grpc.HealthStub(ch)
    request = health_pb2.HealthCheckRequest(service=service)
    watch_refused = False

    async def watch() -> AsyncIterator[bool]:
        call = stub.Watch(request, wait_for_ready=True)
        try:
            async for reply in call:
                yield reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            call.cancel()

    async def poll() -> AsyncIterator[bool]:
        last = None
        while True:
            reply = await stub.Check(request, timeout=1.0, wait_for_ready=True)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            if serving != last:
                last = serving
                yield serving
            await asyncio.sleep(poll_s)

    async def updates() -> AsyncIterator[bool]:
        nonlocal watch_refused
        if not watch_refused:
            try:
                async for serving in watch():
                    yield serving
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _LOST or exc.code() == grpc.StatusCode.CANCELLED:
                    raise
                watch_refused = True
                log.info("Health/Watch refused (%s: %s): polling Health/Check every %.2fs", exc.code().name,
                         exc.details(), poll_s)
        async for serving in poll():
            yield serving

    return updates


class Replica:
    def __init__(self, client: ShardClient, breaker: Breaker, health: HealthUpdates | None = None):
        self.client = client
        self.breaker = breaker
        # Its health, by default watched on the client's own channel (the same connection, mTLS identity included).
        self._health = health

    async def watch(self, backoff_s: float = 0.2, max_backoff_s: float = 1.0) -> None:
        """Follows the replica's health into its breaker until cancelled: SERVING resets it, anything else holds
        it out. A stream that ends or breaks with UNAVAILABLE or DEADLINE_EXCEEDED (the replica went away)
        ejects it; the watch is reopened after `backoff_s`, doubling to `max_backoff_s` while it keeps
        breaking before any report. A watch failing for another reason leaves the breaker to the calls.
        Returns only when the replica has no health service (the breaker alone judges it then)."""
        health = self._health or watch_health(self.client._channel)
        delay, last_why = backoff_s, ""
        while True:
            lost = True
            try:
                async for serving in health():
                    delay = backoff_s
                    if serving:
                        if self.breaker.held or self.breaker.failures:
                            log.info("shard replica %s SERVING: back in the rotation", self.client.target)
                        self.breaker.reset()
                    else:
                        if not self.breaker.held:
                            log.info("shard replica %s not serving: skipped until it is", self.client.target)
                        self.breaker.hold()
                why = "stream ended"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("shard replica %s has no health service: not watched", self.client.target)
                    self.breaker.held = False
                    return
                why, lost = exc.code().name, exc.code() in _LOST
            except Exception as exc:  # noqa: BLE001 - whatever broke the stream, watch again
                why, lost = repr(exc), False
            if lost:
                self.breaker.eject()
            else:  # not the replica's absence: what it last said is no longer known, the calls judge it
                if why != last_why:
                    log.warning("health watch of shard replica %s failed (%s)", self.client.target, why)
                self.breaker.held = False
            last_why = why
            log.debug("health watch of %s broke (%s); again in %.1fs", self.client.target, why, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff_s)

    async def call(self, fn: Callable[[ShardClient], Awaitable[T]]) -> T:
        try:
            result = await fn(self.client)
        except Exception as exc:
            if is_dependency_failure(exc) and not is_behind(exc):  # a replica only behind is not ejected
                self.breaker.failure()
            raise
        self.breaker.success()
        return result


class ShardGroup:
    """One shard: its replicas."""

    def __init__(self, shard_id: int, replicas: list[Replica]):
        self.shard_id = shard_id
        self.replicas = replicas
        self._next = itertools.count()
        self._watchers: list[asyncio.Task] = []

    def start(self) -> list[asyncio.Task]:
        """Starts watching each replica's health (once; `close` stops it); returns the watchers."""
        if not self._watchers:
            self._watchers = [
                asyncio.create_task(r.watch(), name=f"health of shard {self.shard_id} replica {r.client.target}")
                for r in self.replicas
            ]
        return self._watchers

    async def read(self, fn: Callable[[ShardClient], Awaitable[T]], deadline: Deadline) -> T:
        """`fn` on one replica, failing over to the others until one answers or the deadline passes."""
        start = next(self._next) % len(self.replicas)
        ordered = self.replicas[start:] + self.replicas[:start]
        candidates = [r for r in ordered if r.breaker.available()] or ordered[:1]
        last: Exception | None = None
        for replica in candidates:
            if deadline.remaining() == 0:
                break
            try:
                return await replica.call(fn)
            except Exception as exc:
                if not is_dependency_failure(exc):
                    raise
                last = exc
                log.info("shard %d replica %s failed (%s); failing over", self.shard_id, replica.client.target,
                         code_of(exc).name)
        if last is not None:
            raise last
        raise Unavailable(f"shard {self.shard_id}: no replica answered in time")

    async def write(self, fn: Callable[[ShardClient], Awaitable[T]]) -> T:
        """`fn` on the shard's one replica (a standalone shard: replicas follow the log and take no writes)."""
        return await self.replicas[0].call(fn)

    async def close(self) -> None:
        watchers, self._watchers = self._watchers, []
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.gather(*(r.client.close() for r in self.replicas))


def parse_topology(spec: list[str]) -> list[list[str]]:
    """`["a:1|a:2", "b:1|b:2"]` → shard 0 has replicas a:1 and a:2, shard 1 has b:1 and b:2."""
    shards = [[t.strip() for t in item.split("|") if t.strip()] for item in spec]
    if not shards or any(not replicas for replicas in shards):
        raise ValueError("every shard needs at least one replica address")
    return shards
