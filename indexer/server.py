"""gRPC face of one indexer shard: converts proto ⇄ store types and nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from mesh.errors import FailedPrecondition, InvalidArgument, Unavailable
from mesh.settings import ServiceSettings, option
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc

from indexer.store import ChunkRecord, HitRecord, ShardStore

T = TypeVar("T")


@dataclass
class Settings(ServiceSettings):
    data_dir: Path = option(Path("./data/shard-0"), "folder holding this shard's data")
    shard_id: int = option(0, "this shard's id; requests meant for another shard are refused")
    dimension: int = option(384, "length of the vectors this shard accepts")
    default_ef: int = option(64, "HNSW search breadth when a request leaves ef at 0")
    max_k: int = option(1000, "most hits a query may ask for")
    max_batch: int = option(4096, "most chunks, queries or document ids per request")

    def validate(self) -> None:
        super().validate()
        if self.shard_id < 0:
            raise ValueError(f"shard_id must not be negative, got {self.shard_id}")
        for name in ("dimension", "default_ef", "max_k", "max_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class IndexerService:
    """Owns the shard's store and the one thread every store call runs on."""

    name = "indexer"
    service_names = [indexer_pb2.DESCRIPTOR.services_by_name["IndexerService"].full_name]

    def __init__(self, settings: Settings):
        self.settings = settings
        self._store: ShardStore | None = None
        # One worker thread, so store calls run one at a time: hnswlib must not add while it
        # searches, and SQLite's connection stays on the thread that opened it. The event loop
        # only awaits, so health checks keep answering during long writes and searches.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"indexer-{settings.shard_id}")

    def register(self, server: grpc.aio.Server) -> None:
        indexer_pb2_grpc.add_IndexerServiceServicer_to_server(IndexerServicer(self), server)

    async def start(self) -> None:
        await self._on_worker(self._open)

    async def close(self) -> None:
        # Queued behind any open still running, so a shutdown during warm-up closes what it opened.
        await self._on_worker(self._close)
        self._executor.shutdown(wait=False)

    def _open(self) -> None:
        self._store = ShardStore(self.settings.data_dir, self.settings.dimension)

    def _close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()

    async def run(self, call: Callable[..., T], *args) -> T:
        """Runs `call(store, *args)` on the store's thread."""
        store = self._store
        if store is None:
            raise Unavailable(f"indexer shard {self.settings.shard_id} is not ready")
        return await self._on_worker(call, store, *args)

    async def _on_worker(self, call: Callable[..., T], *args) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call, *args)


class IndexerServicer(indexer_pb2_grpc.IndexerServiceServicer):
    def __init__(self, service: IndexerService):
        self._service = service
        self._settings = service.settings

    async def Upsert(self, request: indexer_pb2.UpsertRequest, context) -> indexer_pb2.UpsertResponse:
        self._check_shard(request)
        self._check_batch("chunks", request.chunks)
        chunks = [
            ChunkRecord(
                chunk_id=c.chunk_id,
                document_id=c.document_id,
                vector=np.asarray(c.vector, dtype=np.float32),
                text=c.text,
                source=c.source,
                metadata=dict(c.metadata),
            )
            for c in request.chunks
        ]

        def write(store: ShardStore):
            # One worker-thread call, so no other write can land between the count and the upsert.
            previous = store.chunk_counts(list(dict.fromkeys(c.document_id for c in chunks)))
            return previous, store.upsert(chunks, request.replace_documents)

        previous, (upserted, removed, sequence) = await self._service.run(write)
        return indexer_pb2.UpsertResponse(
            upserted=upserted, removed=removed, sequence=sequence, previous_chunks=previous
        )

    async def Delete(self, request: indexer_pb2.DeleteRequest, context) -> indexer_pb2.DeleteResponse:
        self._check_shard(request)
        self._check_batch("document_ids", request.document_ids)
        removed, sequence = await self._service.run(ShardStore.delete, list(request.document_ids))
        return indexer_pb2.DeleteResponse(removed=removed, sequence=sequence)

    async def Search(self, request: indexer_pb2.SearchRequest, context) -> indexer_pb2.SearchResponse:
        self._check_shard(request)
        self._check_batch("queries", request.queries)
        if not 0 < request.k <= self._settings.max_k:
            raise InvalidArgument("k", f"must be between 1 and {self._settings.max_k}, got {request.k}")
        queries = self._query_matrix(request.queries)
        ef = request.ef or self._settings.default_ef
        results = await self._service.run(ShardStore.search, queries, request.k, ef)
        return indexer_pb2.SearchResponse(
            results=[indexer_pb2.QueryResult(hits=[_hit(h) for h in hits]) for hits in results],
            shard_id=self._settings.shard_id,
        )

    async def Stats(self, request: indexer_pb2.StatsRequest, context) -> indexer_pb2.StatsResponse:
        stats = await self._service.run(ShardStore.stats)
        return indexer_pb2.StatsResponse(
            shard_id=self._settings.shard_id,
            live_chunks=stats.live_chunks,
            documents=stats.documents,
            dimension=stats.dimension,
            sequence=stats.sequence,
            capacity=stats.capacity,
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

    def _query_matrix(self, queries: Sequence[indexer_pb2.Vector]) -> np.ndarray:
        dimension = self._settings.dimension
        for i, query in enumerate(queries):
            if len(query.values) != dimension:
                raise InvalidArgument(f"queries[{i}].values", f"expected {dimension} values, got {len(query.values)}")
        return np.array([query.values for query in queries], dtype=np.float32)


def _hit(hit: HitRecord) -> indexer_pb2.Hit:
    return indexer_pb2.Hit(
        chunk_id=hit.chunk_id,
        document_id=hit.document_id,
        score=hit.score,
        text=hit.text,
        source=hit.source,
        metadata=hit.metadata,
    )


def create_service(settings: Settings) -> IndexerService:
    return IndexerService(settings)
