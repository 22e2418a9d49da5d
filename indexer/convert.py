"""Proto ⇄ store types for the indexer: the only place that knows both."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ragloom.indexer.v1 import indexer_pb2

from fabric.errors import InvalidArgument
from indexer.filters import SearchFilter
from fabric.shardlog import is_part
from indexer.logapply import LogDelete, LogPart, LogPut, LogRecord
from indexer.records import ChunkRecord, HitRecord


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
    """The query vectors as one float32 matrix; refuses a query of another dimension by its index.

    Each Vector is re-serialized (one C call) and its packed floats taken by np.frombuffer: ~10x
    faster than numpy iterating the repeated field, which dominated a single query's decoding.
    """
    header = _packed_header(dimension)
    expected = len(header) + 4 * dimension
    matrix = np.empty((len(queries), dimension), dtype=np.float32)
    for i, query in enumerate(queries):
        data = query.SerializeToString()
        if len(data) == expected and data.startswith(header):
            matrix[i] = np.frombuffer(data, dtype="<f4", offset=len(header))
        elif len(query.values) != dimension:
            raise InvalidArgument(f"queries[{i}].values", f"expected {dimension} values, got {len(query.values)}")
        else:  # the same floats, framed otherwise (unknown fields kept, say): the slow way
            matrix[i] = np.asarray(query.values, dtype=np.float32)
    return matrix


def _packed_header(dimension: int) -> bytes:
    """Field 1 (values), wire type 2 (packed), then the varint byte length of `dimension` floats."""
    size, varint = 4 * dimension, bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        varint.append(byte | (0x80 if size else 0))
        if not size:
            return bytes([0x0A]) + bytes(varint)


def search_filter(request: indexer_pb2.SearchRequest) -> SearchFilter:
    return SearchFilter(
        tenant=request.tenant,
        tags=frozenset(request.tags),
        source=request.source,
        source_prefix=request.source_prefix,
    )


def search_response(results: list[list[HitRecord]], shard_id: int,
                    lexical: list[list[HitRecord]] = ()) -> indexer_pb2.SearchResponse:
    response = indexer_pb2.SearchResponse(shard_id=shard_id)
    _add_results(response.results, results)
    _add_results(response.lexical_results, lexical)
    return response


def _add_results(field, results: list[list[HitRecord]]) -> None:
    # Built in place, empty maps and lists left alone: ~2.5x faster than Hit(...) messages copied in.
    for hits in results:
        added = field.add().hits
        for hit in hits:
            message = added.add(chunk_id=hit.chunk_id, document_id=hit.document_id, score=hit.score,
                                text=hit.text, source=hit.source, tenant=hit.tenant)
            if hit.metadata:
                message.metadata.update(hit.metadata)
            if hit.tags:
                message.tags.extend(hit.tags)


def log_record(subject: str, sequence: int, data: bytes) -> LogRecord:
    """One message of the shard's log as what the store applies; InvalidArgument when it is not a LogEntry."""
    entry = indexer_pb2.LogEntry()
    try:
        entry.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise InvalidArgument("log", f"entry {sequence} on {subject} is not a LogEntry: {exc}") from None
    change = entry.WhichOneof("change")
    if change == "delete":
        return LogDelete(sequence, entry.tenant, entry.document_id)
    if change != "put":
        raise InvalidArgument("log", f"entry {sequence} on {subject} neither writes nor deletes a document")
    chunks = [chunk_record(c) for c in entry.put.chunks]
    if is_part(subject):
        return LogPart(sequence, entry.tenant, entry.document_id, entry.put.content_hash,
                       int(subject.rsplit(".", 1)[1]), chunks)
    return LogPut(sequence, entry.tenant, entry.document_id, entry.put.content_hash, chunks, entry.put.parts)
