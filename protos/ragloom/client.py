"""A typed client for ragloom's public API (ragloom.router.v1.RouterService), blocking and asyncio.

    from ragloom.client import Client

    with Client("127.0.0.1:50051", token=os.environ.get("RAGLOOM_TOKEN")) as rag:
        rag.ingest(["Honeybees dance to show each other where the flowers are."])
        answer = rag.ask("How do bees tell each other where flowers are?")
        print(answer.text, [s.source for s in answer.cited])

It exists so that callers never hold generated stubs: results are frozen dataclasses, failures are typed
exceptions, and the rules every caller would otherwise re-derive live in one place:

* Deadlines: every call has one, `timeout=` per call or the client's default; a streamed ask's covers the
  whole stream, an ingest's each batch.
* Retries: UNAVAILABLE (the router never saw the call, or was stopping) is retried with exponential backoff, a
  bounded number of times, by gRPC's own retry policy, for the methods the protos declare NO_SIDE_EFFECTS or
  IDEMPOTENT (read from the method descriptors, so a method added without the option is never retried); a
  streamed ask only until its first event has arrived. Nothing else is retried: not DEADLINE_EXCEEDED (the
  deadline covers every attempt), and not RESOURCE_EXHAUSTED, whose `retry_after` (the server's RetryInfo)
  is left for the caller to honour, since only the caller knows whether waiting is worth it.
* Errors: a failed call raises a `RagloomError` subclass by status code, carrying the message and the
  google.rpc details the server packed (BadRequest field violations, RetryInfo), also for a stream that
  fails after it began (its `error` event).

It depends on grpcio, protobuf, googleapis-common-protos and the generated stubs only: nothing of the
server side (fabric, router, mesh) is imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, Union

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from ragloom.router.v1 import router_pb2, router_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "Client", "AsyncClient", "Answer", "Source", "Hit", "SearchResult", "Coverage", "Span", "Support", "Timings",
    "Sources", "Token", "Done", "Event", "Document", "Ingested", "IngestResult", "DeleteResult",
    "RagloomError", "InvalidArgument", "FailedPrecondition", "OutOfRange", "NotFound", "PermissionDenied",
    "Unauthenticated", "ResourceExhausted", "Unavailable", "DeadlineExceeded", "Aborted", "Cancelled", "Internal",
    "Unimplemented", "MODES",
]

SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"]

# --------------------------------------------------------------------------------------------- errors


class RagloomError(Exception):
    """A call that failed: its gRPC status code, message and google.rpc details (unpacked where the type is
    one of google.rpc's error details, else left as Any). Subclasses by code say what to do next."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, details: Iterable = ()):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = list(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) of every BadRequest field violation the server sent."""
        return [(v.field, v.description) for d in self.details if isinstance(d, error_details_pb2.BadRequest)
                for v in d.field_violations]

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked the caller to wait before trying again (RetryInfo), None when it did not."""
        for d in self.details:
            if isinstance(d, error_details_pb2.RetryInfo):
                return d.retry_delay.ToNanoseconds() / 1e9
        return None


class InvalidArgument(RagloomError, ValueError):
    """The request is malformed (`field` names the part, when the server said): retrying it unchanged fails."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field(self) -> str:
        violations = self.field_violations
        return violations[0][0] if violations else ""


class FailedPrecondition(RagloomError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(RagloomError):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(RagloomError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(RagloomError):
    """The token may not do this: another tenant's documents, or a write with a read-only token."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RagloomError):
    """No token, or one the gateway does not accept (expired, another issuer's, malformed)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(RagloomError):
    """Overloaded or over quota; `retry_after` says how long the server asked to wait. Never retried here."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RagloomError):
    """Unreachable or down, after the retries; also a require_complete request that some shard missed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RagloomError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(RagloomError):
    """A replica had not yet applied the writes the read asked to see (min_sequences): try again shortly."""

    code = grpc.StatusCode.ABORTED


class Cancelled(RagloomError):
    code = grpc.StatusCode.CANCELLED


class Internal(RagloomError):
    code = grpc.StatusCode.INTERNAL


class Unimplemented(RagloomError):
    code = grpc.StatusCode.UNIMPLEMENTED


_ERRORS: dict[grpc.StatusCode, type[RagloomError]] = {cls.code: cls for cls in (
    InvalidArgument, FailedPrecondition, OutOfRange, NotFound, PermissionDenied, Unauthenticated,
    ResourceExhausted, Unavailable, DeadlineExceeded, Aborted, Cancelled, Internal, Unimplemented)}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_DETAIL_TYPES = tuple(getattr(error_details_pb2, name) for name in (
    "BadRequest", "RetryInfo", "ErrorInfo", "QuotaFailure", "PreconditionFailure", "ResourceInfo", "Help",
    "LocalizedMessage", "DebugInfo", "RequestInfo"))


def _unpack(detail):
    for kind in _DETAIL_TYPES:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return detail


def error(code: grpc.StatusCode, message: str, details: Iterable = ()) -> RagloomError:
    """The typed exception for a status (`details`: google.protobuf.Any, as a google.rpc.Status holds them)."""
    return _ERRORS.get(code, RagloomError)(message, code=code, details=[_unpack(d) for d in details])


def error_from_status(status: status_pb2.Status) -> RagloomError:
    """The typed exception for a google.rpc.Status (an AskStream `error` event)."""
    return error(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message, status.details)


def error_from_rpc(exc: grpc.RpcError) -> RagloomError:
    """The typed exception for a failed call. The details are read from the `grpc-status-details-bin` trailer
    directly, not by grpc_status.rpc_status.from_call: that refuses a status whose message a proxy rewrote."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else "") or str(code.name)
    packed = []
    for key, value in (exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None) or ():
        if key == "grpc-status-details-bin":
            try:
                packed = status_pb2.Status.FromString(value).details
            except DecodeError:
                pass
    return error(code, message, packed)


# -------------------------------------------------------------------------------------------- results

#: Retrieval modes by name: None (or "") lets the router choose (hybrid).
MODES = {"": router_pb2.RETRIEVAL_MODE_UNSPECIFIED, "dense": router_pb2.RETRIEVAL_MODE_DENSE,
         "lexical": router_pb2.RETRIEVAL_MODE_LEXICAL, "hybrid": router_pb2.RETRIEVAL_MODE_HYBRID}
_MODE_NAMES = {value: name for name, value in MODES.items()}


@dataclass(frozen=True)
class Span:
    """A stretch of a passage's text, by code-point offsets (`text[span.start:span.end]` in Python)."""

    start: int
    end: int
    score: float = 0.0


@dataclass(frozen=True)
class Coverage:
    """Which shards a retrieval heard from, the retrieval that ran, and what was degraded."""

    partial: bool = False
    shards_answered: tuple[int, ...] = ()
    shards_failed: tuple[int, ...] = ()
    retrieval: str = ""
    degraded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in milliseconds (zero for a stage that did not run)."""

    embed_ms: float = 0.0
    index_ms: float = 0.0
    generate_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    parse_ms: float = 0.0
    rerank_ms: float = 0.0
    verify_ms: float = 0.0
    generator_queue_ms: float = 0.0
    reread_ms: float = 0.0


@dataclass(frozen=True)
class Hit:
    """One passage found by a search."""

    score: float
    document_id: str
    chunk_id: str
    source: str
    text: str
    shard_id: int
    evidence: tuple[Span, ...] = ()

    @property
    def evidence_text(self) -> list[str]:
        """With rerank: the passage's best sentences, best first."""
        return [self.text[e.start:e.end] for e in self.evidence]


@dataclass(frozen=True)
class Source(Hit):
    """A passage an answer was generated from, numbered as the answer's [n] markers cite it."""

    number: int = 0


@dataclass(frozen=True)
class Support:
    """Where cited source number `source` supports the answer: the stretch `span` of its text, `text`."""

    source: int
    span: Span
    text: str


@dataclass(frozen=True)
class SearchResult:
    """Hits best first (iterate, index or len() it like a list), with the coverage and timings."""

    hits: tuple[Hit, ...]
    coverage: Coverage
    timings: Timings

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, index):
        return self.hits[index]


@dataclass(frozen=True)
class Sources:
    """First event of a streamed answer: the passages it is generated from."""

    sources: tuple[Source, ...]
    coverage: Coverage
    cached: bool


@dataclass(frozen=True)
class Token:
    """Next answer text: whole sentences, each sent once it has been checked against the evidence."""

    text: str


@dataclass(frozen=True)
class Done:
    """Last event of a streamed answer."""

    citations: tuple[int, ...]
    support: tuple[Support, ...]
    timings: Timings
    completion_tokens: int
    abstained: bool
    extractive: bool
    degraded: tuple[str, ...]


Event = Union[Sources, Token, Done]


@dataclass(frozen=True)
class Answer:
    """A whole answer: `text` ends each verified sentence with [n] markers citing `sources`; `abstained` when
    the documents do not answer the question (then `text` says so and `sources` are the closest passages)."""

    text: str
    sources: tuple[Source, ...]
    citations: tuple[int, ...]
    support: tuple[Support, ...]
    coverage: Coverage
    timings: Timings
    completion_tokens: int
    cached: bool
    abstained: bool
    extractive: bool
    degraded: tuple[str, ...]

    @property
    def cited(self) -> list[Source]:
        """The sources the answer cites, in order of first mention."""
        by_number = {s.number: s for s in self.sources}
        return [by_number[n] for n in self.citations if n in by_number]


@dataclass(frozen=True)
class Document:
    """A document to ingest, for full control (ingest also takes plain text, bytes and paths). `id` defaults,
    at the router, to `source`, else a hash of the body: ingesting the same document again replaces it."""

    text: str | None = None
    content: bytes | None = None
    id: str = ""
    source: str = ""
    #: "txt", "md", "html" or "pdf"; empty infers it from `source`, else "txt".
    format: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @classmethod
    def from_path(cls, path: str | os.PathLike, **fields) -> "Document":
        """A file's bytes, identified by its absolute path (so a second ingest of the file replaces the first)."""
        path = Path(path).resolve()
        return cls(content=path.read_bytes(), **{"id": str(path), "source": str(path), **fields})


@dataclass(frozen=True)
class Ingested:
    """What became of one document: its id, the chunks stored, the shard, the chunks of an earlier version removed."""

    id: str
    chunks: int
    shard_id: int
    replaced_chunks: int


@dataclass(frozen=True)
class IngestResult:
    """Every document in input order, and per shard written the log sequence of the last write: pass
    `sequences` as `min_sequences` to a search or ask to read these writes from any replica."""

    documents: tuple[Ingested, ...]
    sequences: Mapping[int, int]

    @property
    def chunks(self) -> int:
        return sum(d.chunks for d in self.documents)


@dataclass(frozen=True)
class DeleteResult:
    """Chunks removed (0 when the document was not there), and the write's sequences (see IngestResult)."""

    removed_chunks: int
    sequences: Mapping[int, int]


def _span(s) -> Span:
    return Span(s.start, s.end, s.score)


def _coverage(c) -> Coverage:
    return Coverage(c.partial, tuple(c.shards_answered), tuple(c.shards_failed), _MODE_NAMES.get(c.retrieval, ""),
                    tuple(c.degraded))


_TIMINGS = tuple(Timings.__dataclass_fields__)


def _timings(t) -> Timings:
    return Timings(*(getattr(t, name) for name in _TIMINGS))


def _hit(h) -> Hit:
    return Hit(h.score, h.document_id, h.chunk_id, h.source, h.text, h.shard_id, tuple(map(_span, h.evidence)))


def _source(s) -> Source:
    return Source(s.score, s.document_id, s.chunk_id, s.source, s.text, s.shard_id, tuple(map(_span, s.evidence)),
                  s.number)


def _support(s) -> Support:
    return Support(s.source, _span(s.span), s.text)


def _search_result(reply) -> SearchResult:
    return SearchResult(tuple(map(_hit, reply.hits)), _coverage(reply.coverage), _timings(reply.timings))


def _answer(r) -> Answer:
    return Answer(r.answer, tuple(map(_source, r.sources)), tuple(r.citations), tuple(map(_support, r.support)),
                  _coverage(r.coverage), _timings(r.timings), r.completion_tokens, r.cached, r.abstained,
                  r.extractive, tuple(r.degraded))


def _event(message) -> Event | None:
    """The typed event of one stream message; an `error` event raises (the stream failed after it began)."""
    kind = message.WhichOneof("event")
    if kind == "token":
        return Token(message.token)
    if kind == "sources":
        s = message.sources
        return Sources(tuple(map(_source, s.sources)), _coverage(s.coverage), s.cached)
    if kind == "done":
        d = message.done
        return Done(tuple(d.citations), tuple(map(_support, d.support)), _timings(d.timings), d.completion_tokens,
                    d.abstained, d.extractive, tuple(d.degraded))
    if kind == "error":
        raise error_from_status(message.error)
    return None  # an event kind newer than this client: skipped


# ------------------------------------------------------------------------------------------- requests


class SearchOptions(TypedDict, total=False):
    """Options of `search`: unset ones use the router's defaults."""

    top_k: int  # hits wanted, 1 to 1000
    tenant: str  # the tenant to search within ("" = the token's, or the default tenant)
    tags: Iterable[str]  # only chunks carrying at least one of these tags
    mode: str  # "dense", "lexical" or "hybrid"
    require_complete: bool  # UNAVAILABLE rather than results from a subset of shards
    rerank: bool  # rerank a wider candidate set; each hit then carries its best sentences
    min_sequences: Mapping[int, int]  # read your writes: an IngestResult's or DeleteResult's `sequences`


class AskOptions(TypedDict, total=False):
    """Options of `ask` and `ask_stream`: unset ones use the router's defaults."""

    top_k: int  # passages retrieved as sources, 1 to 50
    max_tokens: int  # longest answer
    temperature: float  # 0 for greedy, up to 2
    tenant: str
    tags: Iterable[str]
    mode: str
    require_complete: bool
    no_cache: bool  # bypass the answer cache (the fresh answer is still stored)
    min_sequences: Mapping[int, int]


def _scope(tenant: str, tags: Iterable[str]) -> router_pb2.Scope:
    return router_pb2.Scope(tenant=tenant, tags=list(tags))


def _mode(mode: str | None) -> int:
    if (mode or "") not in MODES:
        raise InvalidArgument(f"mode: must be one of {', '.join(m for m in MODES if m)}, got {mode!r}",
                              details=[_violation("mode", f"unknown retrieval mode {mode!r}")])
    return MODES[mode or ""]


def _violation(name: str, description: str) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=name, description=description)])


def search_request(query: str, *, top_k: int | None = None, tenant: str = "", tags: Iterable[str] = (),
                   mode: str | None = None, require_complete: bool = False, rerank: bool | None = None,
                   min_sequences: Mapping[int, int] | None = None) -> router_pb2.SearchRequest:
    """The SearchRequest `Client.search` sends (None leaves an optional field unset: the router's default)."""
    request = router_pb2.SearchRequest(query=query, scope=_scope(tenant, tags), mode=_mode(mode),
                                       require_complete=require_complete, min_sequences=min_sequences or {})
    if top_k is not None:
        request.top_k = top_k
    if rerank is not None:
        request.rerank = rerank
    return request


def ask_request(question: str, *, top_k: int | None = None, max_tokens: int | None = None,
                temperature: float | None = None, tenant: str = "", tags: Iterable[str] = (), mode: str | None = None,
                require_complete: bool = False, no_cache: bool = False,
                min_sequences: Mapping[int, int] | None = None) -> router_pb2.AskRequest:
    """The AskRequest `Client.ask` and `ask_stream` send."""
    request = router_pb2.AskRequest(question=question, scope=_scope(tenant, tags), mode=_mode(mode),
                                    require_complete=require_complete, no_cache=no_cache,
                                    min_sequences=min_sequences or {})
    for name, value in (("top_k", top_k), ("max_tokens", max_tokens), ("temperature", temperature)):
        if value is not None:
            setattr(request, name, value)
    return request


DocumentLike = Union[str, bytes, os.PathLike, Document, router_pb2.Document]


def _document(item: DocumentLike, tags: Iterable[str], metadata: Mapping[str, str] | None) -> router_pb2.Document:
    """`item` as a Document message: str is plain text, bytes raw content (parsed as txt: give a Document with
    `format` or `source` for another), a path is read (folders are not walked), a Document (message) as is;
    `tags` and `metadata` are added to each (a document's own metadata wins)."""
    if isinstance(item, router_pb2.Document):
        doc = router_pb2.Document()
        doc.CopyFrom(item)
    else:
        if isinstance(item, str):
            item = Document(text=item)
        elif isinstance(item, bytes):
            item = Document(content=item)
        elif isinstance(item, os.PathLike):
            item = Document.from_path(item)
        elif not isinstance(item, Document):
            raise TypeError(f"cannot ingest a {type(item).__name__}: give str (text), bytes, a path or a Document")
        doc = router_pb2.Document(id=item.id, source=item.source, format=item.format, metadata=dict(item.metadata),
                                  tags=list(item.tags))
        if item.text is not None:
            doc.text = item.text
        elif item.content is not None:
            doc.content = item.content
    doc.tags.extend(t for t in tags if t not in doc.tags)
    for key, value in (metadata or {}).items():
        doc.metadata.setdefault(key, value)
    return doc


def _batches(documents, tenant: str, tags: Iterable[str], metadata: Mapping[str, str] | None, batch_size: int,
             batch_bytes: int) -> tuple[int, Iterator[router_pb2.IngestRequest]]:
    """How many documents there are, and their IngestRequests: at most `batch_size` documents and (unless one
    document alone is larger) `batch_bytes` each, files read only when their batch is built."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    items = [documents] if isinstance(documents, (str, bytes, os.PathLike, Document, router_pb2.Document)) \
        else list(documents)
    tags = tuple(tags)

    def requests() -> Iterator[router_pb2.IngestRequest]:
        batch, size = [], 0
        for item in items:
            doc = _document(item, tags, metadata)
            doc_size = doc.ByteSize()
            if batch and (len(batch) >= batch_size or size + doc_size > batch_bytes):
                yield router_pb2.IngestRequest(documents=batch, tenant=tenant)
                batch, size = [], 0
            batch.append(doc)
            size += doc_size
        if batch:
            yield router_pb2.IngestRequest(documents=batch, tenant=tenant)

    return len(items), requests()


class _Ingesting:
    """The results of an ingest's batches, merged: documents in order, the last sequence per shard."""

    def __init__(self):
        self.documents: list[Ingested] = []
        self.sequences: dict[int, int] = {}

    def add(self, reply: router_pb2.IngestResponse) -> None:
        self.documents.extend(Ingested(d.id, d.chunks, d.shard_id, d.replaced_chunks) for d in reply.documents)
        for shard, sequence in reply.sequences.items():
            self.sequences[shard] = max(sequence, self.sequences.get(shard, 0))

    def result(self) -> IngestResult:
        return IngestResult(tuple(self.documents), dict(self.sequences))


def _delete_result(reply: router_pb2.DeleteDocumentResponse) -> DeleteResult:
    return DeleteResult(reply.removed_chunks, dict(reply.sequences))


# -------------------------------------------------------------------------------------------- channel

_RETRYABLE_LEVELS = (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT)


def retry_service_config(service=SERVICE, retries: int = 3, initial_backoff_s: float = 0.2,
                         max_backoff_s: float = 2.0) -> str:
    """A gRPC service config retrying UNAVAILABLE up to `retries` times, with exponential backoff (jittered by
    gRPC), for the methods of `service` whose idempotency_level says a repeat is harmless. gRPC allows 5
    attempts at most."""
    if not 0 <= retries <= 4:
        raise ValueError("retries must be between 0 and 4 (gRPC makes at most 5 attempts)")
    names = [{"service": service.full_name, "method": m.name} for m in service.methods
             if m.GetOptions().idempotency_level in _RETRYABLE_LEVELS]
    if not retries or not names:
        return json.dumps({})
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": {
        "maxAttempts": retries + 1, "initialBackoff": f"{initial_backoff_s}s", "maxBackoff": f"{max_backoff_s}s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def _read(value: str | os.PathLike | bytes) -> bytes:
    return value if isinstance(value, bytes) else Path(value).read_bytes()


def _credentials(tls, cert, key) -> grpc.ChannelCredentials | None:
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if tls is None or tls is False:
        if cert or key:
            raise ValueError("a client certificate (mutual TLS) needs tls= as well")
        return None
    if (cert is None) != (key is None):
        raise ValueError("mutual TLS needs both cert= and key=")
    roots = None if tls is True or tls == "system" else _read(tls)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key and _read(key),
                                        certificate_chain=cert and _read(cert))


class _Base:
    """What both clients share: the channel's settings, the token, the default deadline (see Client)."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 60.0, *, tls=None, cert=None,
                 key=None, server_name: str | None = None, retries: int = 3,
                 metadata: Iterable[tuple[str, str]] = (), max_message_mb: int = 64,
                 options: Iterable[tuple[str, object]] = ()):
        if not timeout or timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds: every call has a deadline")
        self.address, self.timeout = address, float(timeout)
        # Sent with each call rather than by an interceptor or call credentials: no Python on the call path,
        # and a token works on a plaintext channel too (a gateway on loopback).
        self.metadata = tuple(metadata) + ((("authorization", f"Bearer {token}"),) if token else ())
        size = max_message_mb * 1024 * 1024
        self._options = [("grpc.service_config", retry_service_config(retries=retries)), ("grpc.enable_retries", 1),
                         ("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                         # a retry must keep the whole request: gRPC gives up retrying one larger than this
                         ("grpc.per_rpc_retry_buffer_size", size)]
        if server_name:
            self._options += [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]
        self._options += list(options)
        self._credentials = _credentials(tls, cert, key)
        self.channel = self._connect()
        self._stub = router_pb2_grpc.RouterServiceStub(self.channel)

    def _connect(self):
        raise NotImplementedError

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


# --------------------------------------------------------------------------------------------- clients


class Client(_Base):
    """A blocking client, safe to share between threads. `Client(address, token=None, timeout=60, tls=None)`:

    * `token`: a bearer token (`ragloom token --tenant NAME`), sent as `authorization: Bearer TOKEN`.
    * `timeout`: the default deadline in seconds; each method takes `timeout=` too.
    * `tls`: None for plaintext; True or "system" for the system's root certificates; a path to (or the bytes
      of) a PEM root certificate; or grpc.ChannelCredentials. `cert`/`key` (paths or PEM bytes): a client
      certificate for mutual TLS. `server_name` overrides the name the server's certificate must carry.
    * `retries`: extra attempts after UNAVAILABLE, 0 to 4 (see the module's docstring).
    * `metadata`: more headers for every call; `options`: more gRPC channel arguments.
    """

    channel: grpc.Channel  #: the underlying channel, e.g. for grpc.health.v1 on the same endpoint

    def _connect(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.address, options=self._options)
        return grpc.secure_channel(self.address, self._credentials, options=self._options)

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def search(self, query: str, *, timeout: float | None = None, **options: Unpack[SearchOptions]) -> SearchResult:
        """The passages closest to `query`, best first, with the shards' coverage."""
        return _search_result(self._call(self._stub.Search, search_request(query, **options), timeout))

    def ask(self, question: str, *, timeout: float | None = None, **options: Unpack[AskOptions]) -> Answer:
        """A whole answer with its sources and citations."""
        return _answer(self._call(self._stub.Ask, ask_request(question, **options), timeout))

    def ask_stream(self, question: str, *, timeout: float | None = None,
                   **options: Unpack[AskOptions]) -> Iterator[Event]:
        """The answer as it is made: Sources, then Token after Token, then Done. A stream that fails, also
        after it began, raises the typed exception; leaving the loop early cancels the call."""
        call = self._stub.AskStream(ask_request(question, **options), timeout=self._timeout(timeout),
                                    metadata=self.metadata)
        return self._events(call)

    @staticmethod
    def _events(call) -> Iterator[Event]:
        try:
            for message in call:
                event = _event(message)
                if event is not None:
                    yield event
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    def ingest(self, documents: DocumentLike | Iterable[DocumentLike], *, tenant: str = "",
               tags: Iterable[str] = (), metadata: Mapping[str, str] | None = None, batch_size: int = 16,
               batch_bytes: int = 8 << 20, progress: Callable[[int, int], None] | None = None,
               timeout: float | None = None) -> IngestResult:
        """Stores documents (text, bytes, paths or Documents; see `Document`) in batches, each with its own
        deadline; `progress(done, total)` after each. A batch is refused whole if one of its documents cannot be
        parsed: the typed exception is raised, the batches before it stay stored, and ingesting the same input
        again is safe (Ingest is idempotent: a document already there is replaced by itself)."""
        total, requests = _batches(documents, tenant, tags, metadata, batch_size, batch_bytes)
        results = _Ingesting()
        for request in requests:
            results.add(self._call(self._stub.Ingest, request, timeout))
            if progress is not None:
                progress(len(results.documents), total)
        return results.result()

    def delete(self, document_id: str, *, tenant: str = "", timeout: float | None = None) -> DeleteResult:
        """Removes a document and all its chunks (none removed is not an error: it was not there)."""
        request = router_pb2.DeleteDocumentRequest(document_id=document_id, tenant=tenant)
        return _delete_result(self._call(self._stub.DeleteDocument, request, timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client: Client's settings and methods, as coroutines (`ask_stream` an async iterator).
    Make it inside the event loop that uses it; `async with AsyncClient(...) as rag:` closes it."""

    channel: grpc.aio.Channel

    def _connect(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.address, options=self._options)
        return grpc.aio.secure_channel(self.address, self._credentials, options=self._options)

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def search(self, query: str, *, timeout: float | None = None,
                     **options: Unpack[SearchOptions]) -> SearchResult:
        return _search_result(await self._call(self._stub.Search, search_request(query, **options), timeout))

    async def ask(self, question: str, *, timeout: float | None = None, **options: Unpack[AskOptions]) -> Answer:
        return _answer(await self._call(self._stub.Ask, ask_request(question, **options), timeout))

    def ask_stream(self, question: str, *, timeout: float | None = None,
                   **options: Unpack[AskOptions]) -> AsyncIterator[Event]:
        call = self._stub.AskStream(ask_request(question, **options), timeout=self._timeout(timeout),
                                    metadata=self.metadata)
        return self._events(call)

    @staticmethod
    async def _events(call) -> AsyncIterator[Event]:
        try:
            async for message in call:
                event = _event(message)
                if event is not None:
                    yield event
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def ingest(self, documents: DocumentLike | Iterable[DocumentLike], *, tenant: str = "",
                     tags: Iterable[str] = (), metadata: Mapping[str, str] | None = None, batch_size: int = 16,
                     batch_bytes: int = 8 << 20, progress: Callable[[int, int], None] | None = None,
                     timeout: float | None = None) -> IngestResult:
        total, requests = _batches(documents, tenant, tags, metadata, batch_size, batch_bytes)
        results = _Ingesting()
        for request in requests:
            results.add(await self._call(self._stub.Ingest, request, timeout))
            if progress is not None:
                progress(len(results.documents), total)
        return results.result()

    async def delete(self, document_id: str, *, tenant: str = "", timeout: float | None = None) -> DeleteResult:
        request = router_pb2.DeleteDocumentRequest(document_id=document_id, tenant=tenant)
        return _delete_result(await self._call(self._stub.DeleteDocument, request, timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
