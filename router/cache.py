"""The router's cache: answers and query embeddings, in Redis or in process, plus single-flight.

Keys carry the tenant's *collection generation*: every ingest or delete in a tenant bumps it,
so a cached answer can never outlive a change to the documents it was drawn from. If Redis
cannot be reached the router serves uncached (and counts it) — a cache outage never fails a
request. A generation bump that could not reach Redis is remembered and the cache stays
bypassed for that tenant until the bump lands, so no stale answer is served after recovery.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from router.metrics import CACHE_LOOKUPS, SINGLE_FLIGHT_SHARED

log = logging.getLogger(__name__)


class CacheBackend(ABC):
    """Byte values with TTLs, and per-tenant generation counters."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    @abstractmethod
    async def generation(self, tenant: str) -> int: ...

    @abstractmethod
    async def bump(self, tenant: str) -> int: ...

    async def close(self) -> None:
        return None


class MemoryBackend(CacheBackend):
    """In-process LRU with expiry: the embedded default when no Redis is configured."""

    def __init__(self, max_entries: int = 10_000):
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._max = max_entries

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._entries[key] = (time.monotonic() + ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def generation(self, tenant: str) -> int:
        return self._generations.get(tenant, 0)

    async def bump(self, tenant: str) -> int:
        self._generations[tenant] = self._generations.get(tenant, 0) + 1
        return self._generations[tenant]


class RedisBackend(CacheBackend):
    """Redis through redis-py's asyncio client, with short timeouts: a slow cache is worse than none."""

    def __init__(self, url: str, timeout_s: float = 0.25, prefix: str = "ragloom"):
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            health_check_interval=0,
        )
        self._prefix = prefix

    async def get(self, key: str) -> bytes | None:
        return await self._redis.get(f"{self._prefix}:{key}")

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(f"{self._prefix}:{key}", value, px=max(1, int(ttl_s * 1000)))

    async def generation(self, tenant: str) -> int:
        value = await self._redis.get(f"{self._prefix}:generation:{tenant}")
        return int(value or 0)

    async def bump(self, tenant: str) -> int:
        return int(await self._redis.incr(f"{self._prefix}:generation:{tenant}"))

    async def close(self) -> None:
        await self._redis.aclose()


class Generations(Protocol):
    async def generation(self, tenant: str) -> int: ...

    async def bump(self, tenant: str) -> int: ...


class Cache:
    """Failure-tolerant cache over a backend, with a breaker so an outage costs one timeout, not one per request."""

    def __init__(self, backend: CacheBackend, ttl_s: float = 600.0, jitter: float = 0.1, retry_after_s: float = 2.0,
                 generations: "Generations | None" = None):
        self.backend = backend
        #: Where the tenants' collection generations live: the backend's, or the shards' log's KV
        #: bucket (then a restart or another router sees every write's bump).
        self.generations: Generations = generations or backend
        self.ttl_s = ttl_s
        self.jitter = jitter
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._pending_bumps: set[str] = set()

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: Exception) -> None:
        CACHE_LOOKUPS.labels("error").inc()
        if self._available():
            log.warning("cache %s failed (%s: %s); serving uncached for %.0fs", what, type(exc).__name__, exc, self.retry_after_s)
        self._down_until = time.monotonic() + self.retry_after_s

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        if not self._available():
            return False, None
        try:
            return True, await fn()
        except Exception as exc:  # noqa: BLE001 - any cache failure degrades to "uncached"
            self._failed(what, exc)
            return False, None

    async def generation(self, tenant: str) -> int | None:
        """The tenant's collection generation, or None when the cache must not be used for it now."""
        if tenant in self._pending_bumps:
            ok, _ = await self._call("bump", lambda: self.generations.bump(tenant))
            if not ok:
                return None
            self._pending_bumps.discard(tenant)
        ok, value = await self._call("generation", lambda: self.generations.generation(tenant))
        return value if ok else None

    async def invalidate(self, tenant: str) -> None:
        """Called after every change to a tenant's documents."""
        ok, _ = await self._call("bump", lambda: self.generations.bump(tenant))
        if not ok:
            self._pending_bumps.add(tenant)

    async def get(self, key: str) -> bytes | None:
        ok, value = await self._call("get", lambda: self.backend.get(key))
        if ok and value is not None:
            CACHE_LOOKUPS.labels("hit").inc()
            return value
        CACHE_LOOKUPS.labels("miss").inc()
        return None

    def bypassed(self) -> None:
        CACHE_LOOKUPS.labels("bypass").inc()

    async def set(self, key: str, value: bytes) -> None:
        ttl = self.ttl_s * random.uniform(1 - self.jitter, 1 + self.jitter)
        await self._call("set", lambda: self.backend.set(key, value, ttl))

    async def close(self) -> None:
        await self.backend.close()


def cache_key(kind: str, **parts: Any) -> str:
    """A compact key over every input that changes the result."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:40]
    return f"{kind}:{digest}"


class Flight:
    """One computation whose events every interested caller receives, live, from the start.

    The computation runs as its own task, so a caller that leaves does not cancel it while
    others still listen; when the last listener leaves, it is cancelled (no work for nobody).
    """

    def __init__(self, produce: Callable[[], AsyncIterator[Any]]):
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.done = False
        self._listeners = 0
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(produce))

    async def _run(self, produce) -> None:
        try:
            async for event in produce():
                self.events.append(event)
                self._notify()
        except asyncio.CancelledError:
            self.error = asyncio.CancelledError()
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to every listener
            self.error = exc
        finally:
            self.done = True
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def listen(self) -> AsyncIterator[Any]:
        self._listeners += 1
        seen = 0
        try:
            while True:
                changed = self._changed
                while seen < len(self.events):
                    yield self.events[seen]
                    seen += 1
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                await changed.wait()
        finally:
            self._listeners -= 1
            if self._listeners == 0 and not self.done:
                self._task.cancel()


class SingleFlight:
    """N identical concurrent requests share one Flight."""

    def __init__(self):
        self._flights: dict[str, Flight] = {}

    def running(self, key: str) -> bool:
        """Whether a flight for `key` is under way (joining it costs nothing more)."""
        flight = self._flights.get(key)
        return flight is not None and not flight.done

    def join(self, key: str, produce: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Any]:
        flight = self._flights.get(key)
        if flight is None or flight.done:
            flight = Flight(produce)
            self._flights[key] = flight
            flight._task.add_done_callback(lambda _: self._flights.pop(key, None) if self._flights.get(key) is flight else None)
        else:
            SINGLE_FLIGHT_SHARED.inc()
        return flight.listen()
