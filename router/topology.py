"""Shards and their replicas as the router sees them: quorum writes, failover reads, ejection.

A replica that fails `eject_after` calls in a row is ejected for `eject_for_s`: requests skip
it, so a dead replica costs nothing; after that one request probes it and a success brings it
back. Reads go to one replica (rotating) and fail over to the next within the request's
deadline. Writes go to every replica that is not ejected and succeed at the write quorum;
the calls still running after the quorum are left to finish, and a replica that misses writes
pulls them from its peers when it returns (the shard's `--peers`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fabric.client import Deadline
from fabric.errors import Unavailable, code_of, is_caller_fault, is_dependency_failure
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
            if is_dependency_failure(exc):
                self.breaker.failure()
            raise
        self.breaker.success()
        return result


class ShardGroup:
    """One shard: its replicas."""

    def __init__(self, shard_id: int, replicas: list[Replica], write_quorum: int | None = None):
        self.shard_id = shard_id
        self.replicas = replicas
        self.write_quorum = write_quorum or len(replicas) // 2 + 1
        if not 1 <= self.write_quorum <= len(replicas):
            raise ValueError(f"shard {shard_id}: write quorum {self.write_quorum} with {len(replicas)} replicas")
        self._next = itertools.count()
        self._background: set[asyncio.Task] = set()

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
        """`fn` on every available replica; returns once `write_quorum` of them acknowledged."""
        targets = [r for r in self.replicas if r.breaker.available()]
        if len(targets) < self.write_quorum:
            raise Unavailable(
                f"shard {self.shard_id}: only {len(targets)} of {len(self.replicas)} replicas reachable, "
                f"write quorum is {self.write_quorum}"
            )
        tasks = [asyncio.ensure_future(r.call(fn)) for r in targets]
        acked: list[T] = []
        errors: list[BaseException] = []
        pending = set(tasks)
        try:
            while pending and len(acked) < self.write_quorum:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        acked.append(task.result())
                    else:
                        errors.append(task.exception())
                if len(acked) + len(pending) < self.write_quorum:
                    break
        finally:
            for task in pending:  # let stragglers finish: their replicas converge sooner
                self._background.add(task)
                task.add_done_callback(self._settle)
        if len(acked) >= self.write_quorum:
            return acked[0]
        caller_faults = [e for e in errors if is_caller_fault(e)]
        if caller_faults:
            raise caller_faults[0]
        detail = "; ".join(f"{type(e).__name__}: {getattr(e, 'details', lambda: e)()}" for e in errors)
        raise Unavailable(f"shard {self.shard_id}: {len(acked)} of {self.write_quorum} replicas needed acknowledged ({detail})")

    def _settle(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("shard %d: a replica missed a write (%s); it catches up from its peers", self.shard_id, task.exception())

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        await asyncio.gather(*(r.client.close() for r in self.replicas))


class VersionClock:
    """Write versions: microseconds since the epoch (the shards' unit), strictly increasing within this router.

    Replicas keep, per chunk and document, the newest version they have seen (last writer wins),
    so any replica can apply any write, late or twice, and all converge on the same content.
    """

    def __init__(self):
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


def parse_topology(spec: list[str]) -> list[list[str]]:
    """`["a:1|a:2", "b:1|b:2"]` → shard 0 has replicas a:1 and a:2, shard 1 has b:1 and b:2."""
    shards = [[t.strip() for t in item.split("|") if t.strip()] for item in spec]
    if not shards or any(not replicas for replicas in shards):
        raise ValueError("every shard needs at least one replica address")
    return shards
