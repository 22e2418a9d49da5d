"""Ingestion: parse → chunk → embed in batches → route each document to its shard by its id → write.

Writes go to the shards' log (LogWrites: acknowledged by JetStream, each with its stream sequence)
or, for standalone shards without a log, straight to each shard's one replica (DirectWrites)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fabric.client import Deadline
from fabric.errors import InvalidArgument
from router.clients import EmbedderClient
from router.clock import Clock
from router.config import RagConfig
from router.domain import ChunkWrite, DocumentInput, Ingested, Timings
from router.metrics import DOWNSTREAM_CALLS
from router.parsing import format_for, parse, title_for
from router.sharding import shard_for
from router.shardlog import ShardLog
from router.topology import ShardGroup


class Splitter(Protocol):
    def split(self, text: str) -> list[str]: ...


#: Called with the tenant once a write to the shards has been attempted, whether or not it succeeded
#: (some shards may have written): the cache invalidates the tenant's answers.
OnWrite = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Written:
    """A document as its shard acknowledged it."""

    sequence: int
    previous_chunks: int
    unchanged: bool = False


class Writes(Protocol):
    async def write_document(self, shard: int, tenant: str, document_id: str, chunks: Sequence[ChunkWrite],
                             content_hash: str, deadline: Deadline) -> Written: ...

    async def delete_document(self, shard: int, tenant: str, document_id: str, deadline: Deadline) -> Written: ...


class LogWrites:
    """Through the shards' log: one entry per document, acknowledged by JetStream."""

    def __init__(self, log: ShardLog):
        self.log = log

    async def write_document(self, shard, tenant, document_id, chunks, content_hash, deadline) -> Written:
        ack = await self.log.write_document(shard, tenant, document_id, chunks, content_hash)
        return Written(ack.sequence, ack.previous_chunks, ack.unchanged)

    async def delete_document(self, shard, tenant, document_id, deadline) -> Written:
        ack = await self.log.delete_document(shard, tenant, document_id)
        return Written(ack.sequence, ack.previous_chunks, ack.unchanged)


class DirectWrites:
    """Straight to a standalone shard (one replica, no log): what the tests' fakes and benchmarks use."""

    def __init__(self, shards: list[ShardGroup]):
        for group in shards:
            if len(group.replicas) != 1:
                raise ValueError(f"shard {group.shard_id} has {len(group.replicas)} replicas: replicas follow the "
                                 "shard's log, so writes need one (--nats-url)")
        self.shards = shards

    async def write_document(self, shard, tenant, document_id, chunks, content_hash, deadline) -> Written:
        previous = await self.shards[shard].write(lambda client: client.upsert(chunks, deadline))
        return Written(0, previous.get(document_id, 0))

    async def delete_document(self, shard, tenant, document_id, deadline) -> Written:
        removed = await self.shards[shard].write(lambda client: client.delete([document_id], tenant, deadline))
        return Written(0, removed, unchanged=removed == 0)


def content_hash(model: str, source: str, metadata: dict[str, str], tags: Sequence[str], chunks: Sequence[str]) -> str:
    """What decides a document's entry, hashed: the same document ingested again (with the same embedding
    model) is the same entry; under another model its vectors differ, so it is written again."""
    digest = hashlib.sha256()
    for part in (model, source, json.dumps(metadata, sort_keys=True), json.dumps(sorted(tags)), *chunks):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


@dataclass
class Parsed:
    """One document made ready to embed: its id, the format it was read as, its chunks."""

    document: DocumentInput
    id: str
    format: str
    chunks: list[str]


def document_id(doc: DocumentInput) -> str:
    """The id a document is stored under: the given one, else its source, else a hash of its body."""
    if doc.id:
        return doc.id
    if doc.source:
        return doc.source
    body = doc.body.encode() if isinstance(doc.body, str) else doc.body
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]


class Ingestion:
    def __init__(self, config: RagConfig, chunker: Splitter, embedder: EmbedderClient, shards: list[ShardGroup],
                 writes: Writes | None = None):
        self.config = config
        self.chunker = chunker
        self.embedder = embedder
        self.shards = shards
        self.writes = writes or DirectWrites(shards)
        #: Per shard, the highest log sequence this router has had acknowledged: reads wait for it by
        #: default, so a client reads its own writes through the same router.
        self.written: dict[int, int] = {}

    async def ingest(self, documents: list[DocumentInput], deadline: Deadline, tenant: str = "",
                     on_write: OnWrite | None = None) -> tuple[list[Ingested], Timings, dict[int, int]]:
        clock, timings = Clock(), Timings()
        if not documents:
            raise InvalidArgument("documents", "at least one document is required")
        if len(documents) > self.config.max_documents:
            raise InvalidArgument("documents", f"{len(documents)} documents exceed the limit of {self.config.max_documents} per call")
        ids = [document_id(d) for d in documents]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("documents", "two documents in one request share an id")
        # Parse and chunk every document before writing anything: one bad file refuses the batch whole.
        parsed = await asyncio.to_thread(self._parse_all, documents, ids)
        timings.parse_ms = clock.lap()
        chunks = sum(len(p.chunks) for p in parsed)
        if chunks > self.config.max_chunks_per_request:
            raise InvalidArgument("documents", f"these documents make {chunks} chunks, more than the limit of "
                                               f"{self.config.max_chunks_per_request} per request (the router's "
                                               f"--max-chunks-per-request): send them in smaller requests")

        # Each chunk is embedded with its document's title in front (the stored text stays as it is).
        texts = [_titled(title_for(p.document.source or p.id), text) for p in parsed for text in p.chunks]
        DOWNSTREAM_CALLS.labels("embedder").inc()
        vectors = await self.embedder.embed(texts, deadline)
        model = await self.embedder.model(deadline)
        timings.embed_ms = clock.lap()

        results, writes, row = [], [], 0
        for p in parsed:
            shard = shard_for(p.id, len(self.shards))
            metadata = {**p.document.metadata, "format": p.format}
            source = p.document.source or p.id
            chunks = [ChunkWrite(chunk_id=f"{p.id}#{i}", document_id=p.id, text=text, source=source,
                                 vector=vectors[row + i], tenant=tenant, metadata=metadata, tags=tuple(p.document.tags))
                      for i, text in enumerate(p.chunks)]
            row += len(chunks)
            digest = content_hash(model, source, metadata, p.document.tags, p.chunks)
            writes.append(self.writes.write_document(shard, tenant, p.id, chunks, digest, deadline))
            results.append(Ingested(id=p.id, chunks=len(chunks), shard_id=shard))
        acked: list[Written | BaseException] = []
        try:
            acked = await asyncio.gather(*writes, return_exceptions=True)
        finally:
            if on_write is not None and (not acked or any(isinstance(a, BaseException) or not a.unchanged for a in acked)):
                await on_write(tenant)
        failed = next((a for a in acked if isinstance(a, BaseException)), None)
        if failed is not None:
            raise failed
        sequences: dict[int, int] = {}
        for result, ack in zip(results, acked):
            result.replaced_chunks = ack.previous_chunks
            if ack.sequence:
                sequences[result.shard_id] = max(sequences.get(result.shard_id, 0), ack.sequence)
        self._remember(sequences)
        timings.index_ms = clock.lap()
        timings.total_ms = clock.total()
        return results, timings, sequences

    def _remember(self, sequences: dict[int, int]) -> None:
        for shard, sequence in sequences.items():
            self.written[shard] = max(self.written.get(shard, 0), sequence)

    def _parse_all(self, documents: list[DocumentInput], ids: list[str]) -> list[Parsed]:
        out = []
        for i, (doc, doc_id) in enumerate(zip(documents, ids)):
            name = f"documents[{i}]" + (f" ({doc.source or doc.id})" if doc.source or doc.id else "")
            if len(doc.body) > self.config.max_document_bytes:
                raise InvalidArgument(name, f"larger than the {self.config.max_document_bytes} byte limit")
            try:
                fmt = format_for(doc.source, doc.format)
            except ValueError as exc:
                raise InvalidArgument(f"documents[{i}].format", str(exc)) from None
            chunks = self.chunker.split(parse(doc.body, fmt, field=name))
            if not chunks:
                raise InvalidArgument(name, "no text found in the document")
            out.append(Parsed(doc, doc_id, fmt, chunks))
        return out

    async def delete(self, document_id: str, deadline: Deadline, tenant: str = "",
                     on_write: OnWrite | None = None) -> tuple[int, dict[int, int]]:
        """Removes a document; returns the chunks it had and its shard's log sequence of the delete."""
        if not document_id:
            raise InvalidArgument("document_id", "must not be empty")
        shard = shard_for(document_id, len(self.shards))
        ack = None
        try:
            ack = await self.writes.delete_document(shard, tenant, document_id, deadline)
        finally:
            if on_write is not None and (ack is None or not ack.unchanged):
                await on_write(tenant)
        sequences = {shard: ack.sequence} if ack.sequence else {}
        self._remember(sequences)
        return ack.previous_chunks, sequences


def _titled(title: str, text: str) -> str:
    return f"{title}: {text}" if title else text
