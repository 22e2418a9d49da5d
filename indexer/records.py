"""The value types ShardStore takes and returns, and the checks a chunk passes before it is written.

None of these types knows SQLite or hnswlib; indexer/convert.py maps them to and from protos.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fabric.errors import InvalidArgument

_MAX_TAGS = 64
_MAX_NAME = 256


@dataclass
class ChunkRecord:
    """A chunk to write; `vector` must have the shard's dimension."""

    chunk_id: str
    document_id: str
    vector: np.ndarray | Sequence[float]
    text: str = ""
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    tenant: str = ""
    tags: Sequence[str] = ()


class Payload:
    """What a search returns of one chunk besides its score: read from SQLite once, then shared by
    every search that finds the chunk (and kept in the shard's payload cache). Never changed.

    `wire` is a memo for the serving layer: the chunk as it goes out in a response, encoded the first
    time one carries it (indexer/convert.py), so a chunk found again costs a lookup, not an encoding.
    The store never reads it."""

    __slots__ = ("tenant", "chunk_id", "document_id", "text", "source", "metadata", "tags", "wire")

    def __init__(self, tenant: str, chunk_id: str, document_id: str, text: str, source: str,
                 metadata: dict[str, str], tags: tuple[str, ...]):
        self.tenant, self.chunk_id, self.document_id = tenant, chunk_id, document_id
        self.text, self.source, self.metadata, self.tags = text, source, metadata, tags
        self.wire: bytes | None = None


class HitRecord:
    """A chunk found by a search; `score` is the cosine similarity to the query (BM25 for lexical).

    Two references, made per hit: the chunk's fields are read through its shared `payload`
    (`metadata` and `tags` as copies, so a hit cannot change what other searches return)."""

    __slots__ = ("payload", "score")

    def __init__(self, payload: Payload, score: float):
        self.payload, self.score = payload, score

    chunk_id = property(lambda self: self.payload.chunk_id)
    document_id = property(lambda self: self.payload.document_id)
    text = property(lambda self: self.payload.text)
    source = property(lambda self: self.payload.source)
    tenant = property(lambda self: self.payload.tenant)
    metadata = property(lambda self: dict(self.payload.metadata))
    tags = property(lambda self: list(self.payload.tags))

    def _key(self) -> tuple:
        p = self.payload
        return p.chunk_id, p.document_id, self.score, p.text, p.source, p.metadata, p.tenant, tuple(p.tags)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HitRecord) and self._key() == other._key()

    __hash__ = None  # equal by value, and the score is a float: not a dict key

    def __repr__(self) -> str:
        return f"HitRecord(chunk_id={self.chunk_id!r}, document_id={self.document_id!r}, score={self.score!r})"


@dataclass(frozen=True)
class WriteResult:
    #: Chunks written.
    written: int
    #: Chunks removed (deleted documents, or chunks a replaced document no longer has).
    removed: int
    #: Chunks not written because this shard holds a newer version of them or their document.
    skipped: int
    #: The shard's sequence number after the write.
    sequence: int
    #: The version the write carried.
    version: int


@dataclass(frozen=True)
class ClearedDocument:
    """Every chunk of the document older than `version` is gone."""

    tenant: str
    document_id: str
    version: int


@dataclass
class ShardStats:
    live_chunks: int
    documents: int
    dimension: int
    sequence: int
    #: Slots the HNSW index holds before it must grow.
    capacity: int
    #: Index slots of deleted chunks, reused by later writes.
    deleted_chunks: int
    tenants: int
    max_version: int
    store_id: int
    tombstones: int
    snapshot_sequence: int | None
    snapshot_age_s: float | None
    index_bytes: int
    #: The shard log's sequence applied here.
    log_sequence: int
    rss_bytes: int


def validate_chunks(chunks: Sequence[ChunkRecord], dimension: int, one_tenant: bool) -> np.ndarray:
    """The chunks' vectors as one float32 matrix; raises InvalidArgument naming the first bad field."""
    seen: set[tuple[str, str]] = set()
    vectors = np.empty((len(chunks), dimension), dtype=np.float32)
    for i, chunk in enumerate(chunks):
        if not chunk.chunk_id:
            raise InvalidArgument(f"chunks[{i}].chunk_id", "must not be empty")
        if (chunk.tenant, chunk.chunk_id) in seen:
            raise InvalidArgument(f"chunks[{i}].chunk_id", f"{chunk.chunk_id!r} appears twice in the request")
        seen.add((chunk.tenant, chunk.chunk_id))
        if not chunk.document_id:
            raise InvalidArgument(f"chunks[{i}].document_id", "must not be empty")
        check_name(f"chunks[{i}].tenant", chunk.tenant)
        if one_tenant and chunk.tenant != chunks[0].tenant:
            raise InvalidArgument(f"chunks[{i}].tenant", "every chunk of one request must have the same tenant")
        if len(chunk.tags) > _MAX_TAGS:
            raise InvalidArgument(f"chunks[{i}].tags", f"at most {_MAX_TAGS} tags, got {len(chunk.tags)}")
        for j, tag in enumerate(chunk.tags):
            if not tag:
                raise InvalidArgument(f"chunks[{i}].tags[{j}]", "must not be empty")
            check_name(f"chunks[{i}].tags[{j}]", tag)
        vector = np.asarray(chunk.vector, dtype=np.float32)
        if vector.shape != (dimension,):
            raise InvalidArgument(f"chunks[{i}].vector", f"expected {dimension} values, got {vector.size}")
        if not np.isfinite(vector).all():
            raise InvalidArgument(f"chunks[{i}].vector", "values must be finite")
        if not vector.any():
            raise InvalidArgument(f"chunks[{i}].vector", "must not be all zeros (cosine is undefined)")
        vectors[i] = vector
    return vectors


def check_name(field: str, value: str) -> None:
    """Refuses a tenant or tag longer than the store keeps."""
    if len(value) > _MAX_NAME:
        raise InvalidArgument(field, f"at most {_MAX_NAME} characters, got {len(value)}")


def decode_json(text: str):
    """json.loads with the common empty cases short-cut (a search decodes two per hit)."""
    if text == "{}":
        return {}
    if text == "[]":
        return []
    return json.loads(text)
