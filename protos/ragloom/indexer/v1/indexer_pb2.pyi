from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Chunk(_message.Message):
    __slots__ = ("chunk_id", "document_id", "text", "source", "metadata", "vector", "tenant", "tags")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    chunk_id: str
    document_id: str
    text: str
    source: str
    metadata: _containers.ScalarMap[str, str]
    vector: _containers.RepeatedScalarFieldContainer[float]
    tenant: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, chunk_id: _Optional[str] = ..., document_id: _Optional[str] = ..., text: _Optional[str] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., vector: _Optional[_Iterable[float]] = ..., tenant: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("chunks", "replace_documents", "shard_id", "version")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    replace_documents: bool
    shard_id: int
    version: int
    def __init__(self, chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., replace_documents: _Optional[bool] = ..., shard_id: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "removed", "sequence", "previous_chunks", "skipped", "version")
    class PreviousChunksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    removed: int
    sequence: int
    previous_chunks: _containers.ScalarMap[str, int]
    skipped: int
    version: int
    def __init__(self, upserted: _Optional[int] = ..., removed: _Optional[int] = ..., sequence: _Optional[int] = ..., previous_chunks: _Optional[_Mapping[str, int]] = ..., skipped: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("document_ids", "shard_id", "tenant", "version")
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    shard_id: int
    tenant: str
    version: int
    def __init__(self, document_ids: _Optional[_Iterable[str]] = ..., shard_id: _Optional[int] = ..., tenant: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("removed", "sequence", "version")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    removed: int
    sequence: int
    version: int
    def __init__(self, removed: _Optional[int] = ..., sequence: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("queries", "k", "ef", "shard_id", "tenant", "tags", "source", "source_prefix", "min_sequence", "texts")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Vector]
    k: int
    ef: int
    shard_id: int
    tenant: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    source: str
    source_prefix: str
    min_sequence: int
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, queries: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., k: _Optional[int] = ..., ef: _Optional[int] = ..., shard_id: _Optional[int] = ..., tenant: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., source_prefix: _Optional[str] = ..., min_sequence: _Optional[int] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class LexicalSearchRequest(_message.Message):
    __slots__ = ("queries", "k", "shard_id", "tenant", "tags", "source", "source_prefix", "min_sequence")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedScalarFieldContainer[str]
    k: int
    shard_id: int
    tenant: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    source: str
    source_prefix: str
    min_sequence: int
    def __init__(self, queries: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., shard_id: _Optional[int] = ..., tenant: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., source_prefix: _Optional[str] = ..., min_sequence: _Optional[int] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("chunk_id", "document_id", "score", "text", "source", "metadata", "tenant", "tags")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    chunk_id: str
    document_id: str
    score: float
    text: str
    source: str
    metadata: _containers.ScalarMap[str, str]
    tenant: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, chunk_id: _Optional[str] = ..., document_id: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., tenant: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "shard_id", "lexical_results")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryResult]
    shard_id: int
    lexical_results: _containers.RepeatedCompositeFieldContainer[QueryResult]
    def __init__(self, results: _Optional[_Iterable[_Union[QueryResult, _Mapping]]] = ..., shard_id: _Optional[int] = ..., lexical_results: _Optional[_Iterable[_Union[QueryResult, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "live_chunks", "documents", "dimension", "sequence", "capacity", "deleted_chunks", "max_version", "snapshot_sequence", "snapshot_age_s", "index_bytes", "rss_bytes", "tenants", "store_id", "tombstones", "log_sequence", "log_last_sequence", "apply_error")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LIVE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DELETED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LOG_LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    APPLY_ERROR_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    live_chunks: int
    documents: int
    dimension: int
    sequence: int
    capacity: int
    deleted_chunks: int
    max_version: int
    snapshot_sequence: int
    snapshot_age_s: float
    index_bytes: int
    rss_bytes: int
    tenants: int
    store_id: int
    tombstones: int
    log_sequence: int
    log_last_sequence: int
    apply_error: str
    def __init__(self, shard_id: _Optional[int] = ..., live_chunks: _Optional[int] = ..., documents: _Optional[int] = ..., dimension: _Optional[int] = ..., sequence: _Optional[int] = ..., capacity: _Optional[int] = ..., deleted_chunks: _Optional[int] = ..., max_version: _Optional[int] = ..., snapshot_sequence: _Optional[int] = ..., snapshot_age_s: _Optional[float] = ..., index_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., tenants: _Optional[int] = ..., store_id: _Optional[int] = ..., tombstones: _Optional[int] = ..., log_sequence: _Optional[int] = ..., log_last_sequence: _Optional[int] = ..., apply_error: _Optional[str] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("tenant", "document_id", "put", "delete")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    document_id: str
    put: DocumentChunks
    delete: DocumentDeleted
    def __init__(self, tenant: _Optional[str] = ..., document_id: _Optional[str] = ..., put: _Optional[_Union[DocumentChunks, _Mapping]] = ..., delete: _Optional[_Union[DocumentDeleted, _Mapping]] = ...) -> None: ...

class DocumentChunks(_message.Message):
    __slots__ = ("chunks", "content_hash", "parts")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    content_hash: str
    parts: int
    def __init__(self, chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., content_hash: _Optional[str] = ..., parts: _Optional[int] = ...) -> None: ...

class DocumentDeleted(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
