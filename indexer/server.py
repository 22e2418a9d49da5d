"""gRPC face of one indexer shard replica: the servicer converts proto ⇄ store types; the service owns
the store's thread and the background work (following the shard's log, snapshots)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from prometheus_client import Gauge

from indexer import convert
from fabric.shardlog import LogSettings
from indexer.follower import Follower
from indexer.snapshots import Manifest
from indexer.store import ShardStore
from fabric.errors import DiskFull, FailedPrecondition, InvalidArgument, Unavailable
from fabric.settings import ServiceSettings, option
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Settings(ServiceSettings):
    service = "indexer"

    data_dir: Path = option(Path("./data/shard-0"), "folder holding this shard's data")
    shard_id: int = option(0, "this shard's id; requests meant for another shard are refused")
    dimension: int = option(384, "length of the vectors this shard accepts")
    default_ef: int = option(64, "HNSW search breadth when a request leaves ef at 0")
    max_k: int = option(1000, "most hits a query may ask for")
    max_batch: int = option(4096, "most chunks, queries or document ids per request")
    hnsw_m: int = option(16, "HNSW links per node (used when the index is built from scratch)")
    ef_construction: int = option(200, "HNSW build breadth (used when the index is built from scratch)")
    exact_search_max: int = option(2048, "filtered searches allowing at most this many chunks are answered by brute force")
    snapshot_every: int = option(10_000, "chunks written or removed after which the index is snapshotted")
    snapshot_interval_s: float = option(300.0, "longest a change waits for a snapshot (0: only by count and at shutdown)")
    snapshots_kept: int = option(2, "index snapshots kept; a corrupt newest one falls back to the one before")
    nats_url: str = option("", "NATS server(s) holding the shard's log (JetStream), e.g. nats://127.0.0.1:4222; "
                                "this replica follows it and takes no direct writes. Empty: a standalone shard "
                                "written through Upsert/Delete (tests, benchmarks)")
    log_replicas: int = option(1, "replicas of the shard's stream when this replica creates it (3 in a cluster)")
    catchup_timeout_s: float = option(120.0, "longest a starting replica waits to catch up with its log before serving")
    apply_batch: int = option(256, "log entries applied in one transaction, at most")
    payload_cache: int = option(100_000, "payloads of chunks found lately kept in memory, each with its encoded "
                                        "hit (about twice its text), at most (0: none)")
    one_hop_queries: int = option(64, "a Search of at most this many queries reads its payloads on the store's "
                                      "thread in the same call as the index (one thread hop instead of two)")
    inline_search: int = option(256, "an unfiltered Search whose queries x max(ef, k) is at most this runs on the "
                                     "event loop when the store's thread is idle, with no thread hop (0: never)")

    def validate(self) -> None:
        super().validate()
        if self.shard_id < 0:
            raise ValueError(f"shard_id must not be negative, got {self.shard_id}")
        positive = ("dimension", "default_ef", "max_k", "max_batch", "hnsw_m", "ef_construction", "snapshot_every",
                    "snapshots_kept", "catchup_timeout_s", "apply_batch", "log_replicas")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("exact_search_max", "snapshot_interval_s", "payload_cache", "one_hop_queries", "inline_search"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


LIVE_CHUNKS = Gauge("ragloom_indexer_live_chunks", "Chunks this shard can find, by shard", ["shard"])


class IndexerService:
    """Owns the shard's store, the thread its calls run on (plus readers of search payloads), and
    the background loops (snapshots, catch-up from peer replicas)."""

    name = "indexer"
    service_names = [indexer_pb2.DESCRIPTOR.services_by_name["IndexerService"].full_name]

    def __init__(self, settings: Settings):
        self.settings = settings
        self._store: ShardStore | None = None
        # One worker thread, so store calls run one at a time: hnswlib must not add while it
        # searches, and SQLite's connection stays on the thread that opened it. The event loop
        # only awaits, so health checks keep answering during long writes and searches.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"indexer-{settings.shard_id}")
        # Held by every call on that thread, so that a small search may run on the event loop instead
        # while the thread is idle (`inline`): store calls still run one at a time.
        self._store_lock = threading.Lock()
        # Threads that read search payloads from SQLite while the store's thread goes on.
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"indexer-{settings.shard_id}-read")
        self.follower = Follower(
            LogSettings(settings.nats_url, settings.log_replicas, settings.tls_cert, settings.tls_key, settings.tls_ca),
            settings.shard_id, self.write, batch=settings.apply_batch,
        ) if settings.nats_url else None
        self._snapshot_due = asyncio.Event()
        self._stopping = asyncio.Event()
        self._snapshot_lock = asyncio.Lock()
        self._loops: list[asyncio.Task] = []

    def register(self, server: grpc.aio.Server) -> None:
        indexer_pb2_grpc.add_IndexerServiceServicer_to_server(IndexerServicer(self), server)

    def bind_health(self, report) -> None:
        if self.follower is not None:
            self.follower.report = report

    async def start(self) -> None:
        await self._on_worker(self._open)
        if self.follower is not None:  # a replica serves once caught up with its log (bounded wait)
            await self.follower.start(self._store.log_sequence, self.settings.catchup_timeout_s)
        self._loops = [asyncio.create_task(self._snapshot_loop())]

    async def caught_up(self, min_sequence: int | None, deadline_s: float | None) -> None:
        """Returns once this replica has applied its log through `min_sequence` (read your writes)."""
        if min_sequence and self.follower is not None:
            # Answer "behind" a little before the caller's deadline, so the caller can still go elsewhere.
            await self.follower.wait_applied(min_sequence, None if deadline_s is None else max(0.0, deadline_s - 0.25))

    async def close(self) -> None:
        self._stopping.set()
        # Loops finish what they are doing (a snapshot half-published would race the last one).
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self.follower is not None:
            await self.follower.close()
        if self._store is not None:
            try:
                await self.snapshot()  # the next start then replays nothing
            except Exception:  # noqa: BLE001 - the data is safe in SQLite; the next start replays more
                log.exception("snapshot at shutdown failed")
        await asyncio.to_thread(self._readers.shutdown)  # no search is left to read for
        # Queued behind any open still running, so a shutdown during warm-up closes what it opened.
        await self._on_worker(self._close)
        self._executor.shutdown(wait=False)

    async def run(self, call: Callable[..., T], *args) -> T:
        """Runs `call(store, *args)` on the store's thread."""
        store = self._store
        if store is None:
            raise Unavailable(f"indexer shard {self.settings.shard_id} is not ready")
        return await self._on_worker(call, store, *args)

    def inline(self, call: Callable[..., T | None], *args) -> T | None:
        """`call(store, *args)` right here, on the event loop, if the store's thread is idle; None when it
        is not (or when `call` says None). Only for a call bounded to about a fraction of a millisecond:
        meanwhile the loop serves nothing else, but it spares two thread hops, which on a small search
        cost more than the search."""
        store = self._store
        if store is None:
            raise Unavailable(f"indexer shard {self.settings.shard_id} is not ready")
        if not self._store_lock.acquire(blocking=False):
            return None
        try:
            with self._disk_full_named():
                return call(store, *args)
        finally:
            self._store_lock.release()

    async def read(self, call: Callable[..., T], *args) -> T:
        """Runs `call(store, *args)` on a reader thread; only for store methods that allow it."""
        store = self._store
        if store is None:
            raise Unavailable(f"indexer shard {self.settings.shard_id} is not ready")
        loop = asyncio.get_running_loop()
        with self._disk_full_named():
            return await loop.run_in_executor(self._readers, call, store, *args)

    async def write(self, call: Callable[..., T], *args) -> T:
        """`run` for a write: asks for a snapshot once enough has changed since the last one."""
        result = await self.run(call, *args)
        if self._store is not None and self._store.unsnapshotted >= self.settings.snapshot_every:
            self._snapshot_due.set()
        return result

    async def snapshot(self) -> Manifest | None:
        """Snapshots the index unless the newest snapshot is current. Searches wait only while the
        index is copied into a file; checksum, fsync and rename run on another thread."""
        async with self._snapshot_lock:
            started = time.perf_counter()
            staged = await self.run(ShardStore.stage_snapshot)
            if staged is None:
                return None
            saved = time.perf_counter()
            try:
                with self._disk_full_named():
                    manifest = await asyncio.to_thread(self._store.publish_snapshot, staged)
            except Exception:
                staged.path.unlink(missing_ok=True)  # a copy of the index left behind fills the disk further
                raise
            await self.run(ShardStore.snapshot_published, manifest)
            log.info("snapshot at sequence %d: %.1f MB saved in %.2fs (searches waited), published in %.2fs",
                     manifest.sequence, manifest.bytes / 1e6, saved - started, time.perf_counter() - saved)
            return manifest

    def _open(self) -> None:
        s = self.settings
        self._store = ShardStore(
            s.data_dir, s.dimension, m=s.hnsw_m, ef_construction=s.ef_construction,
            snapshots_kept=s.snapshots_kept, exact_search_max=s.exact_search_max, payload_cache=s.payload_cache,
        )
        LIVE_CHUNKS.labels(str(s.shard_id)).set_function(lambda: self._store.live_chunks if self._store else 0)

    def _close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()

    async def _on_worker(self, call: Callable[..., T], *args) -> T:
        loop = asyncio.get_running_loop()
        with self._disk_full_named():
            return await loop.run_in_executor(self._executor, self._locked, call, *args)

    def _locked(self, call: Callable[..., T], *args) -> T:
        with self._store_lock:
            return call(*args)

    @contextlib.contextmanager
    def _disk_full_named(self) -> Iterator[None]:
        """A full disk raised inside the block becomes DiskFull naming the shard and its folder: what an
        operator must act on, rather than an INTERNAL OperationalError."""
        try:
            yield
        except (sqlite3.OperationalError, OSError) as exc:
            if not _disk_full(exc):
                raise
            raise DiskFull(f"shard {self.settings.shard_id}: the disk holding {self.settings.data_dir} is full: "
                           f"{exc}") from exc

    async def _snapshot_loop(self) -> None:
        interval = self.settings.snapshot_interval_s or None
        while not self._stopping.is_set():
            await _first_of(self._snapshot_due, self._stopping, timeout=interval)
            self._snapshot_due.clear()
            if self._stopping.is_set():
                return
            try:
                await self.snapshot()
            except Exception:  # noqa: BLE001 - a failed snapshot costs replay time at the next start, not data
                log.exception("snapshot failed")


def _disk_full(exc: sqlite3.OperationalError | OSError) -> bool:
    """SQLite's SQLITE_FULL (raised by the COMMIT that found no room), or the OS's ENOSPC (snapshot files)."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


async def _first_of(*events: asyncio.Event, timeout: float | None) -> None:
    """Returns once any of `events` is set, or after `timeout` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class IndexerServicer(indexer_pb2_grpc.IndexerServiceServicer):
    def __init__(self, service: IndexerService):
        self._service = service
        self._settings = service.settings

    def _check_direct_writes(self) -> None:
        if self._service.follower is not None:
            raise FailedPrecondition(f"shard {self._settings.shard_id} follows its log: write through the router "
                                     "(which publishes to the log), not to a replica")

    async def Upsert(self, request: indexer_pb2.UpsertRequest, context) -> indexer_pb2.UpsertResponse:
        self._check_direct_writes()
        self._check_shard(request)
        self._check_batch("chunks", request.chunks)
        chunks = [convert.chunk_record(c) for c in request.chunks]
        version = request.version if request.HasField("version") else None
        previous, result = await self._service.write(
            ShardStore.upsert_with_previous, chunks, request.replace_documents, version
        )
        return indexer_pb2.UpsertResponse(
            upserted=result.written, removed=result.removed, sequence=result.sequence, previous_chunks=previous,
            skipped=result.skipped, version=result.version,
        )

    async def Delete(self, request: indexer_pb2.DeleteRequest, context) -> indexer_pb2.DeleteResponse:
        self._check_direct_writes()
        self._check_shard(request)
        self._check_batch("document_ids", request.document_ids)
        version = request.version if request.HasField("version") else None
        result = await self._service.write(ShardStore.delete, list(request.document_ids), request.tenant, version)
        return indexer_pb2.DeleteResponse(removed=result.removed, sequence=result.sequence, version=result.version)

    async def Search(self, request: indexer_pb2.SearchRequest, context) -> indexer_pb2.SearchResponse:
        self._check_shard(request)
        self._check_batch("queries", request.queries)
        if not 0 < request.k <= self._settings.max_k:
            raise InvalidArgument("k", f"must be between 1 and {self._settings.max_k}, got {request.k}")
        queries = convert.query_matrix(request.queries, self._settings.dimension)
        if request.HasField("min_sequence") and request.min_sequence:
            await self._service.caught_up(request.min_sequence, context.time_remaining())
        ef = request.ef or self._settings.default_ef
        where = convert.search_filter(request)
        if not request.texts:
            return convert.search_response(await self._dense(queries, request.k, ef, where), self._settings.shard_id)
        # Hybrid in one call: BM25 on a reader thread while the dense search runs.
        self._check_texts("texts", request.texts)
        lexical = asyncio.ensure_future(self._lexical(list(request.texts), request.k, where))
        try:
            await asyncio.sleep(0)  # lets BM25 reach its reader thread before a dense search on this loop
            dense = await self._dense(queries, request.k, ef, where)
        except BaseException:
            lexical.cancel()
            raise
        return convert.search_response(dense, self._settings.shard_id, await lexical)

    async def _dense(self, queries, k: int, ef: int, where) -> list:
        if len(queries) * max(ef, k) <= self._settings.inline_search and not where.narrows_tenant:
            results = self._service.inline(ShardStore.quick_search, queries, k, ef, where)
            if results is not None:
                return results
        if len(queries) <= self._settings.one_hop_queries:
            # Few queries: their payloads (mostly cached) cost less than a second thread hop.
            return await self._service.run(ShardStore.search, queries, k, ef, where)
        neighbours = await self._service.run(ShardStore.nearest, queries, k, ef, where)
        # Payloads are read off the store's thread, which meanwhile takes the next search.
        return await self._service.read(ShardStore.hits, neighbours, where.tenant)

    async def _lexical(self, texts: list[str], k: int, where) -> list:
        # The allowed labels taken while the store's thread is idle, BM25 on a reader thread: a dense
        # search (hybrid retrieval sends both at once) need not wait behind it on the store's thread.
        allowed = self._service.inline(ShardStore.allowed, where)
        if allowed is not None:
            return await self._service.read(ShardStore.lexical_search_of, allowed, texts, k, where.tenant)
        return await self._service.run(ShardStore.lexical_search, texts, k, where)

    async def LexicalSearch(self, request: indexer_pb2.LexicalSearchRequest, context) -> indexer_pb2.SearchResponse:
        self._check_shard(request)
        self._check_batch("queries", request.queries)
        if not 0 < request.k <= self._settings.max_k:
            raise InvalidArgument("k", f"must be between 1 and {self._settings.max_k}, got {request.k}")
        self._check_texts("queries", request.queries)
        where = convert.search_filter(request)
        await self._service.caught_up(_min_sequence(request), context.time_remaining())
        return convert.search_response(await self._lexical(list(request.queries), request.k, where),
                                       self._settings.shard_id)

    def _check_texts(self, field: str, texts: Sequence[str]) -> None:
        self._check_batch(field, texts)
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"{field}[{i}]", "must not be empty")

    async def Stats(self, request: indexer_pb2.StatsRequest, context) -> indexer_pb2.StatsResponse:
        stats = await self._service.run(ShardStore.stats)
        follower = self._service.follower
        return indexer_pb2.StatsResponse(
            shard_id=self._settings.shard_id,
            live_chunks=stats.live_chunks,
            documents=stats.documents,
            dimension=stats.dimension,
            sequence=stats.sequence,
            capacity=stats.capacity,
            deleted_chunks=stats.deleted_chunks,
            max_version=stats.max_version,
            snapshot_sequence=stats.snapshot_sequence,
            snapshot_age_s=stats.snapshot_age_s,
            index_bytes=stats.index_bytes,
            rss_bytes=stats.rss_bytes,
            tenants=stats.tenants,
            store_id=stats.store_id,
            tombstones=stats.tombstones,
            log_sequence=stats.log_sequence,
            log_last_sequence=follower.last_seen if follower else 0,
            apply_error=follower.error if follower else "",
        )

    def _check_shard(self, request) -> None:
        if request.HasField("shard_id") and request.shard_id != self._settings.shard_id:
            raise FailedPrecondition(
                f"request meant for shard {request.shard_id} reached shard {self._settings.shard_id}"
            )

    def _check_batch(self, field: str, items: Sequence) -> None:
        if not items:
            raise InvalidArgument(field, "must not be empty")
        if len(items) > self._settings.max_batch:
            raise InvalidArgument(field, f"at most {self._settings.max_batch} per request, got {len(items)}")


def _min_sequence(request) -> int | None:
    return request.min_sequence if request.HasField("min_sequence") else None


def create_service(settings: Settings) -> IndexerService:
    return IndexerService(settings)
