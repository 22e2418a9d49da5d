from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AskRequest(_message.Message):
    __slots__ = ("question", "top_k", "max_tokens", "temperature")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    question: str
    top_k: int
    max_tokens: int
    temperature: float
    def __init__(self, question: _Optional[str] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("number", "document_id", "chunk_id", "source", "text", "score", "shard_id")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    number: int
    document_id: str
    chunk_id: str
    source: str
    text: str
    score: float
    shard_id: int
    def __init__(self, number: _Optional[int] = ..., document_id: _Optional[str] = ..., chunk_id: _Optional[str] = ..., source: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., shard_id: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("embed_ms", "index_ms", "generate_ms", "time_to_first_token_ms", "total_ms", "parse_ms")
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    INDEX_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PARSE_MS_FIELD_NUMBER: _ClassVar[int]
    embed_ms: float
    index_ms: float
    generate_ms: float
    time_to_first_token_ms: float
    total_ms: float
    parse_ms: float
    def __init__(self, embed_ms: _Optional[float] = ..., index_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., parse_ms: _Optional[float] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("answer", "sources", "citations", "timings", "completion_tokens")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    answer: str
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    citations: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    completion_tokens: int
    def __init__(self, answer: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., citations: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class AskSources(_message.Message):
    __slots__ = ("sources",)
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    def __init__(self, sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ...) -> None: ...

class AskDone(_message.Message):
    __slots__ = ("citations", "timings", "completion_tokens")
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    completion_tokens: int
    def __init__(self, citations: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class AskStreamResponse(_message.Message):
    __slots__ = ("sources", "token", "done")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    sources: AskSources
    token: str
    done: AskDone
    def __init__(self, sources: _Optional[_Union[AskSources, _Mapping]] = ..., token: _Optional[str] = ..., done: _Optional[_Union[AskDone, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "top_k")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("score", "document_id", "chunk_id", "source", "text", "shard_id")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    score: float
    document_id: str
    chunk_id: str
    source: str
    text: str
    shard_id: int
    def __init__(self, score: _Optional[float] = ..., document_id: _Optional[str] = ..., chunk_id: _Optional[str] = ..., source: _Optional[str] = ..., text: _Optional[str] = ..., shard_id: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "timings")
    HITS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    timings: Timings
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "source", "text", "content", "format", "metadata")
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
    id: str
    source: str
    text: str
    content: bytes
    format: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., source: _Optional[str] = ..., text: _Optional[str] = ..., content: _Optional[bytes] = ..., format: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("documents", "timings")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[IngestedDocument]
    timings: Timings
    def __init__(self, documents: _Optional[_Iterable[_Union[IngestedDocument, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class DeleteDocumentRequest(_message.Message):
    __slots__ = ("document_id",)
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    def __init__(self, document_id: _Optional[str] = ...) -> None: ...

class DeleteDocumentResponse(_message.Message):
    __slots__ = ("removed_chunks",)
    REMOVED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    removed_chunks: int
    def __init__(self, removed_chunks: _Optional[int] = ...) -> None: ...
