"""Shards and their replicas as the router sees them: failover reads, ejection.

A replica that fails `eject_after` calls in a row is ejected for `eject_for_s`: requests skip
it, so a dead replica costs nothing; after that one request probes it and a success brings it
back. Reads go to one replica (rotating) and fail over to the next within the request's
deadline. Replicas follow their shard's log, so the router never writes to them; only a
standalone shard (one replica, no log) is written directly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fabric.client import Deadline
from fabric.errors import Unavailable, code_of, is_behind, is_caller_fault, is_dependency_failure
from router.clients import ShardClient

log = logging.getLogger(__name__)
T = TypeVar("T")

class Breaker:
    def __init__(self, eject_after: int = 3, eject_for_s: float = 5.0):
        self.eject_after = eject_after
        self.eject_for_s = eject_for_s
        self.failures = 0
        self.ejected_until = 0.0
        self._probing = False

    def available(self) -> bool:
        """True when closed, or when the ejection has run out and no probe is under way (this call is the probe)."""
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


class Replica:
    def __init__(self, client: ShardClient, breaker: Breaker):
        self.client = client
        self.breaker = breaker

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
        await asyncio.gather(*(r.client.close() for r in self.replicas))


def parse_topology(spec: list[str]) -> list[list[str]]:
    """`["a:1|a:2", "b:1|b:2"]` → shard 0 has replicas a:1 and a:2, shard 1 has b:1 and b:2."""
    shards = [[t.strip() for t in item.split("|") if t.strip()] for item in spec]
    if not shards or any(not replicas for replicas in shards):
        raise ValueError("every shard needs at least one replica address")
    return shards
