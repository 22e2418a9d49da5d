from google.api import annotations_pb2 as _annotations_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrievalMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_MODE_UNSPECIFIED: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_DENSE: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_LEXICAL: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_HYBRID: _ClassVar[RetrievalMode]
RETRIEVAL_MODE_UNSPECIFIED: RetrievalMode
RETRIEVAL_MODE_DENSE: RetrievalMode
RETRIEVAL_MODE_LEXICAL: RetrievalMode
RETRIEVAL_MODE_HYBRID: RetrievalMode

class Scope(_message.Message):
    __slots__ = ("tenant", "tags")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("question", "top_k", "max_tokens", "temperature", "scope", "mode", "require_complete", "no_cache", "min_sequences")
    class MinSequencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    question: str
    top_k: int
    max_tokens: int
    temperature: float
    scope: Scope
    mode: RetrievalMode
    require_complete: bool
    no_cache: bool
    min_sequences: _containers.ScalarMap[int, int]
    def __init__(self, question: _Optional[str] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ..., mode: _Optional[_Union[RetrievalMode, str]] = ..., require_complete: _Optional[bool] = ..., no_cache: _Optional[bool] = ..., min_sequences: _Optional[_Mapping[int, int]] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end", "score")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    score: float
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class Support(_message.Message):
    __slots__ = ("source", "span", "text")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    source: int
    span: Span
    text: str
    def __init__(self, source: _Optional[int] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class Coverage(_message.Message):
    __slots__ = ("partial", "shards_answered", "shards_failed", "retrieval", "degraded")
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    SHARDS_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FAILED_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    partial: bool
    shards_answered: _containers.RepeatedScalarFieldContainer[int]
    shards_failed: _containers.RepeatedScalarFieldContainer[int]
    retrieval: RetrievalMode
    degraded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, partial: _Optional[bool] = ..., shards_answered: _Optional[_Iterable[int]] = ..., shards_failed: _Optional[_Iterable[int]] = ..., retrieval: _Optional[_Union[RetrievalMode, str]] = ..., degraded: _Optional[_Iterable[str]] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("number", "document_id", "chunk_id", "source", "text", "score", "shard_id", "evidence")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    number: int
    document_id: str
    chunk_id: str
    source: str
    text: str
    score: float
    shard_id: int
    evidence: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, number: _Optional[int] = ..., document_id: _Optional[str] = ..., chunk_id: _Optional[str] = ..., source: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., shard_id: _Optional[int] = ..., evidence: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("embed_ms", "index_ms", "generate_ms", "time_to_first_token_ms", "total_ms", "parse_ms", "rerank_ms", "verify_ms", "generator_queue_ms", "reread_ms")
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    INDEX_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PARSE_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    REREAD_MS_FIELD_NUMBER: _ClassVar[int]
    embed_ms: float
    index_ms: float
    generate_ms: float
    time_to_first_token_ms: float
    total_ms: float
    parse_ms: float
    rerank_ms: float
    verify_ms: float
    generator_queue_ms: float
    reread_ms: float
    def __init__(self, embed_ms: _Optional[float] = ..., index_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., parse_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ..., verify_ms: _Optional[float] = ..., generator_queue_ms: _Optional[float] = ..., reread_ms: _Optional[float] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("answer", "sources", "citations", "timings", "completion_tokens", "coverage", "cached", "abstained", "support", "extractive", "degraded")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ABSTAINED_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    EXTRACTIVE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    answer: str
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    citations: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    completion_tokens: int
    coverage: Coverage
    cached: bool
    abstained: bool
    support: _containers.RepeatedCompositeFieldContainer[Support]
    extractive: bool
    degraded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, answer: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., citations: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., completion_tokens: _Optional[int] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ..., cached: _Optional[bool] = ..., abstained: _Optional[bool] = ..., support: _Optional[_Iterable[_Union[Support, _Mapping]]] = ..., extractive: _Optional[bool] = ..., degraded: _Optional[_Iterable[str]] = ...) -> None: ...

class AskSources(_message.Message):
    __slots__ = ("sources", "coverage", "cached")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    coverage: Coverage
    cached: bool
    def __init__(self, sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class AskDone(_message.Message):
    __slots__ = ("citations", "timings", "completion_tokens", "abstained", "support", "extractive", "degraded")
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ABSTAINED_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    EXTRACTIVE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    completion_tokens: int
    abstained: bool
    support: _containers.RepeatedCompositeFieldContainer[Support]
    extractive: bool
    degraded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, citations: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., completion_tokens: _Optional[int] = ..., abstained: _Optional[bool] = ..., support: _Optional[_Iterable[_Union[Support, _Mapping]]] = ..., extractive: _Optional[bool] = ..., degraded: _Optional[_Iterable[str]] = ...) -> None: ...

class AskStreamResponse(_message.Message):
    __slots__ = ("sources", "token", "done", "error")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sources: AskSources
    token: str
    done: AskDone
    error: _status_pb2.Status
    def __init__(self, sources: _Optional[_Union[AskSources, _Mapping]] = ..., token: _Optional[str] = ..., done: _Optional[_Union[AskDone, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "top_k", "scope", "mode", "require_complete", "rerank", "min_sequences")
    class MinSequencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    scope: Scope
    mode: RetrievalMode
    require_complete: bool
    rerank: bool
    min_sequences: _containers.ScalarMap[int, int]
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ..., mode: _Optional[_Union[RetrievalMode, str]] = ..., require_complete: _Optional[bool] = ..., rerank: _Optional[bool] = ..., min_sequences: _Optional[_Mapping[int, int]] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("score", "document_id", "chunk_id", "source", "text", "shard_id", "evidence")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    score: float
    document_id: str
    chunk_id: str
    source: str
    text: str
    shard_id: int
    evidence: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, score: _Optional[float] = ..., document_id: _Optional[str] = ..., chunk_id: _Optional[str] = ..., source: _Optional[str] = ..., text: _Optional[str] = ..., shard_id: _Optional[int] = ..., evidence: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "timings", "coverage")
    HITS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    timings: Timings
    coverage: Coverage
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "source", "text", "content", "format", "metadata", "tags")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    source: str
    text: str
    content: bytes
    format: str
    metadata: _containers.ScalarMap[str, str]
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., source: _Optional[str] = ..., text: _Optional[str] = ..., content: _Optional[bytes] = ..., format: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("documents", "tenant")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    tenant: str
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., tenant: _Optional[str] = ...) -> None: ...

class IngestedDocument(_message.Message):
    __slots__ = ("id", "chunks", "shard_id", "replaced_chunks")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    id: str
    chunks: int
    shard_id: int
    replaced_chunks: int
    def __init__(self, id: _Optional[str] = ..., chunks: _Optional[int] = ..., shard_id: _Optional[int] = ..., replaced_chunks: _Optional[int] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("documents", "timings", "sequences")
    class SequencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[IngestedDocument]
    timings: Timings
    sequences: _containers.ScalarMap[int, int]
    def __init__(self, documents: _Optional[_Iterable[_Union[IngestedDocument, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., sequences: _Optional[_Mapping[int, int]] = ...) -> None: ...

class DeleteDocumentRequest(_message.Message):
    __slots__ = ("document_id", "tenant")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    tenant: str
    def __init__(self, document_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class DeleteDocumentResponse(_message.Message):
    __slots__ = ("removed_chunks", "sequences")
    class SequencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    REMOVED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    removed_chunks: int
    sequences: _containers.ScalarMap[int, int]
    def __init__(self, removed_chunks: _Optional[int] = ..., sequences: _Optional[_Mapping[int, int]] = ...) -> None: ...
