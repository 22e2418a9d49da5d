import asyncio

import pytest

from tests.support.metrics import sample
from tests.support.redis import RedisProcess
from router.cache import Cache, MemoryBackend, RedisBackend, SingleFlight, cache_key


async def test_memory_cache_hits_and_generation_invalidation():
    hits, misses = sample("ragloom_router_cache_lookups_total", result="hit"), sample("ragloom_router_cache_lookups_total", result="miss")
    cache = Cache(MemoryBackend())
    gen = await cache.generation("acme")
    key = cache_key("answer", q="bees?", generation=gen)
    assert await cache.get(key) is None
    await cache.set(key, b"answer")
    assert await cache.get(key) == b"answer"
    await cache.invalidate("acme")
    assert await cache.generation("acme") == gen + 1
    assert await cache.generation("other") == 0, "generations are per tenant"
    assert cache_key("answer", q="bees?", generation=gen + 1) != key
    assert sample("ragloom_router_cache_lookups_total", result="hit") == hits + 1
    assert sample("ragloom_router_cache_lookups_total", result="miss") == misses + 1


async def test_unreachable_redis_degrades_to_uncached_and_remembers_bumps(unused_tcp_port):
    errors = sample("ragloom_router_cache_lookups_total", result="error")
    cache = Cache(RedisBackend(f"redis://127.0.0.1:{unused_tcp_port}/0", timeout_s=0.1), retry_after_s=0.2)
    assert await cache.generation("t") is None  # no cache for this request
    assert await cache.get("k") is None
    await cache.set("k", b"v")  # no exception
    await cache.invalidate("t")
    assert sample("ragloom_router_cache_lookups_total", result="error") > errors
    assert "t" in cache._pending_bumps
    await cache.close()


@pytest.fixture(scope="module")
def redis_server():
    redis = RedisProcess()
    redis.start()
    yield f"redis://127.0.0.1:{redis.port}/0"
    redis.stop()


@pytest.fixture
async def redis_cache(redis_server):
    cache = Cache(RedisBackend(redis_server), ttl_s=30)
    await cache.backend._redis.flushdb()
    yield cache
    await cache.close()


async def test_redis_cache_round_trip_and_ttl_jitter(redis_cache):
    gen = await redis_cache.generation("acme")
    await redis_cache.set("answer:x", b"42")
    assert await redis_cache.get("answer:x") == b"42"
    await redis_cache.invalidate("acme")
    assert await redis_cache.generation("acme") == gen + 1
    ttl = await redis_cache.backend._redis.pttl("ragloom:answer:x")
    assert 26_000 <= ttl <= 33_000


async def test_single_flight_runs_once_and_every_listener_gets_every_event():
    runs = 0

    async def produce():
        nonlocal runs
        runs += 1
        for i in range(3):
            await asyncio.sleep(0.01)
            yield i

    flights = SingleFlight()
    shared = sample("ragloom_router_single_flight_shared_total")

    async def listen():
        return [e async for e in flights.join("k", produce)]

    results = await asyncio.gather(*(listen() for _ in range(50)))
    assert runs == 1 and sample("ragloom_router_single_flight_shared_total") == shared + 49
    assert all(r == [0, 1, 2] for r in results)


async def test_single_flight_stops_the_work_when_every_listener_leaves():
    stopped = asyncio.Event()

    async def produce():
        try:
            for i in range(1000):
                await asyncio.sleep(0.01)
                yield i
        finally:
            stopped.set()

    flights = SingleFlight()
    stream = flights.join("k", produce)
    assert await stream.__anext__() == 0
    await stream.aclose()
    await asyncio.wait_for(stopped.wait(), 1)


async def test_single_flight_shares_errors():
    async def produce():
        raise ValueError("boom")
        yield

    flights = SingleFlight()
    with pytest.raises(ValueError):
        [e async for e in flights.join("k", produce)]
