"""Proto ⇄ store types for the indexer: the only place that knows both."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ragloom.indexer.v1 import indexer_pb2

from fabric.errors import InvalidArgument
from indexer.filters import SearchFilter
from indexer.records import ChangePage, ChunkRecord, ClearedDocument, HitRecord


def chunk_record(chunk: indexer_pb2.Chunk) -> ChunkRecord:
    return ChunkRecord(
        chunk_id=chunk.chunk_id,
        document_id=chunk.document_id,
        vector=np.asarray(chunk.vector, dtype=np.float32),
        text=chunk.text,
        source=chunk.source,
        metadata=dict(chunk.metadata),
        tenant=chunk.tenant,
        tags=list(chunk.tags),
    )


def chunk_message(chunk: ChunkRecord) -> indexer_pb2.Chunk:
    return indexer_pb2.Chunk(
        chunk_id=chunk.chunk_id,
        document_id=chunk.document_id,
        text=chunk.text,
        source=chunk.source,
        metadata=chunk.metadata,
        vector=np.asarray(chunk.vector, dtype=np.float32).tolist(),  # a list converts ~5x faster than an array
        tenant=chunk.tenant,
        tags=chunk.tags,
    )


def query_matrix(queries: Sequence[indexer_pb2.Vector], dimension: int) -> np.ndarray:
    """The query vectors as one float32 matrix; refuses a query of another dimension by its index."""
    for i, query in enumerate(queries):
        if len(query.values) != dimension:
            raise InvalidArgument(f"queries[{i}].values", f"expected {dimension} values, got {len(query.values)}")
    return np.array([query.values for query in queries], dtype=np.float32)


def search_filter(request: indexer_pb2.SearchRequest) -> SearchFilter:
    return SearchFilter(
        tenant=request.tenant,
        tags=frozenset(request.tags),
        source=request.source,
        source_prefix=request.source_prefix,
    )


def search_response(results: list[list[HitRecord]], shard_id: int) -> indexer_pb2.SearchResponse:
    # Built in place, empty maps and lists left alone: ~2.5x faster than Hit(...) messages copied in.
    response = indexer_pb2.SearchResponse(shard_id=shard_id)
    for hits in results:
        added = response.results.add().hits
        for hit in hits:
            message = added.add(chunk_id=hit.chunk_id, document_id=hit.document_id, score=hit.score,
                                text=hit.text, source=hit.source, tenant=hit.tenant)
            if hit.metadata:
                message.metadata.update(hit.metadata)
            if hit.tags:
                message.tags.extend(hit.tags)
    return response


def change_batch(page: ChangePage) -> indexer_pb2.ChangeBatch:
    return indexer_pb2.ChangeBatch(
        chunks=[indexer_pb2.VersionedChunk(chunk=chunk_message(c), version=v) for c, v in page.chunks],
        cleared=[
            indexer_pb2.ClearedDocument(tenant=c.tenant, document_id=c.document_id, version=c.version)
            for c in page.cleared
        ],
        sequence=page.sequence,
        store_id=page.store_id,
    )


def change_page(batch: indexer_pb2.ChangeBatch) -> ChangePage:
    return ChangePage(
        chunks=[(chunk_record(c.chunk), c.version) for c in batch.chunks],
        cleared=[ClearedDocument(c.tenant, c.document_id, c.version) for c in batch.cleared],
        sequence=batch.sequence,
        store_id=batch.store_id,
        done=False,
    )
