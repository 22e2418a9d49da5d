"""Ingestion: parse → chunk → embed in batches → route each chunk to its shard by its document id → write."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
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
from router.topology import ShardGroup, VersionClock


class Splitter(Protocol):
    def split(self, text: str) -> list[str]: ...


#: Called with the tenant once a write to the shards has been attempted, whether or not it succeeded
#: (some shards may have written): the cache invalidates the tenant's answers.
OnWrite = Callable[[str], Awaitable[None]]


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
    def __init__(self, config: RagConfig, chunker: Splitter, embedder: EmbedderClient, shards: list[ShardGroup]):
        self.config = config
        self.chunker = chunker
        self.embedder = embedder
        self.shards = shards
        self.versions = VersionClock()

    async def ingest(self, documents: list[DocumentInput], deadline: Deadline, tenant: str = "",
                     on_write: OnWrite | None = None) -> tuple[list[Ingested], Timings]:
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

        # Each chunk is embedded with its document's title in front (the stored text stays as it is).
        texts = [_titled(title_for(p.document.source or p.id), text) for p in parsed for text in p.chunks]
        DOWNSTREAM_CALLS.labels("embedder").inc()
        vectors = await self.embedder.embed(texts, deadline)
        timings.embed_ms = clock.lap()

        per_shard: dict[int, list[ChunkWrite]] = {}
        results, row = [], 0
        for p in parsed:
            shard = shard_for(p.id, len(self.shards))
            metadata = {**p.document.metadata, "format": p.format}
            for i, text in enumerate(p.chunks):
                per_shard.setdefault(shard, []).append(ChunkWrite(
                    chunk_id=f"{p.id}#{i}", document_id=p.id, text=text, source=p.document.source or p.id,
                    vector=vectors[row], tenant=tenant, metadata=metadata, tags=tuple(p.document.tags),
                ))
                row += 1
            results.append(Ingested(id=p.id, chunks=len(p.chunks), shard_id=shard))
        version = self.versions.next()
        try:
            replies = await asyncio.gather(*(
                self.shards[shard].write(lambda client, c=chunks: client.upsert(c, version, deadline))
                for shard, chunks in per_shard.items()
            ))
        finally:
            if on_write is not None:
                await on_write(tenant)
        previous = {doc_id: n for counts in replies for doc_id, n in counts.items()}
        for result in results:
            result.replaced_chunks = previous.get(result.id, 0)
        timings.index_ms = clock.lap()
        timings.total_ms = clock.total()
        return results, timings

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

    async def delete(self, document_id: str, deadline: Deadline, tenant: str = "", on_write: OnWrite | None = None) -> int:
        if not document_id:
            raise InvalidArgument("document_id", "must not be empty")
        shard = self.shards[shard_for(document_id, len(self.shards))]
        version = self.versions.next()
        try:
            return await shard.write(lambda client: client.delete([document_id], tenant, version, deadline))
        finally:
            if on_write is not None:
                await on_write(tenant)


def _titled(title: str, text: str) -> str:
    return f"{title}: {text}" if title else text
