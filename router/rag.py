"""The RAG flow, free of gRPC servicer concerns: ingest, search and ask over the mesh clients."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from mesh.client import Deadline
from mesh.errors import FailedPrecondition, InvalidArgument
from ragloom.generator.v1 import generator_pb2
from ragloom.indexer.v1 import indexer_pb2
from router.chunking import Chunker
from router.clients import EmbedderClient, GeneratorClient, ShardClient
from router.parsing import format_for, parse
from router.prompt import STOP_SEQUENCES, Passage, build_messages, cited_numbers
from router.sharding import shard_for


@dataclass
class DocumentInput:
    id: str
    source: str
    body: str | bytes
    format: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Ingested:
    id: str
    chunks: int
    shard_id: int
    replaced_chunks: int = 0


@dataclass
class Hit:
    score: float
    document_id: str
    chunk_id: str
    source: str
    text: str
    shard_id: int


@dataclass
class Timings:
    embed_ms: float = 0.0
    index_ms: float = 0.0
    generate_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    parse_ms: float = 0.0


@dataclass
class AskSources:
    sources: list[tuple[int, Hit]]


@dataclass
class AskToken:
    text: str


@dataclass
class AskDone:
    citations: list[int]
    timings: Timings
    completion_tokens: int


class _Clock:
    def __init__(self):
        self.start = time.perf_counter()
        self.mark = self.start

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.mark = (now - self.mark) * 1000, now
        return elapsed

    def total(self) -> float:
        return (time.perf_counter() - self.start) * 1000


@dataclass
class RagConfig:
    default_top_k: int = 5
    max_top_k: int = 1000
    ask_top_k: int = 4
    max_ask_top_k: int = 50
    ef: int = 64
    max_tokens: int = 256
    temperature: float = 0.0
    context_tokens: int = 2048
    max_document_bytes: int = 50 * 1024 * 1024
    max_documents: int = 256
    # Citation fallback: when the model writes no [n] markers, sources this close to the answer are cited.
    attribution_min_score: float = 0.45


class Rag:
    def __init__(
        self,
        config: RagConfig,
        chunker: Chunker,
        embedder: EmbedderClient,
        shards: list[ShardClient],
        generator: GeneratorClient,
    ):
        self.config = config
        self.chunker = chunker
        self.embedder = embedder
        self.shards = shards
        self.generator = generator

    # ---- ingest -------------------------------------------------------------------------------
    async def ingest(self, documents: list[DocumentInput], deadline: Deadline) -> tuple[list[Ingested], Timings]:
        clock, timings = _Clock(), Timings()
        if not documents:
            raise InvalidArgument("documents", "at least one document is required")
        if len(documents) > self.config.max_documents:
            raise InvalidArgument("documents", f"{len(documents)} documents exceed the limit of {self.config.max_documents} per call")
        ids = [self._document_id(d) for d in documents]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("documents", "two documents in one request share an id")
        # Parse and chunk every document before writing anything: one bad file refuses the batch whole.
        chunked = await asyncio.to_thread(self._parse_and_chunk, documents)
        timings.parse_ms = clock.lap()

        texts = [text for chunks in chunked for text in chunks]
        vectors = await self.embedder.embed(texts, deadline)
        timings.embed_ms = clock.lap()

        per_shard: dict[int, list[indexer_pb2.Chunk]] = {}
        results, row = [], 0
        for doc, doc_id, chunks in zip(documents, ids, chunked):
            shard = shard_for(doc_id, len(self.shards))
            metadata = {**doc.metadata, "format": format_for(doc.source, doc.format)}
            for i, text in enumerate(chunks):
                per_shard.setdefault(shard, []).append(
                    indexer_pb2.Chunk(
                        chunk_id=f"{doc_id}#{i}", document_id=doc_id, text=text, source=doc.source or doc_id,
                        metadata=metadata, vector=vectors[row],
                    )
                )
                row += 1
            results.append(Ingested(id=doc_id, chunks=len(chunks), shard_id=shard))
        replies = await asyncio.gather(
            *(self.shards[shard].upsert(chunks, deadline) for shard, chunks in per_shard.items())
        )
        previous = {doc_id: n for reply in replies for doc_id, n in reply.previous_chunks.items()}
        for result in results:
            result.replaced_chunks = previous.get(result.id, 0)
        timings.index_ms = clock.lap()
        timings.total_ms = clock.total()
        return results, timings

    def _document_id(self, doc: DocumentInput) -> str:
        if doc.id:
            return doc.id
        if doc.source:
            return doc.source
        body = doc.body.encode() if isinstance(doc.body, str) else doc.body
        return "sha256:" + hashlib.sha256(body).hexdigest()[:32]

    def _parse_and_chunk(self, documents: list[DocumentInput]) -> list[list[str]]:
        out = []
        for i, doc in enumerate(documents):
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
            out.append(chunks)
        return out

    async def delete(self, document_id: str, deadline: Deadline) -> int:
        if not document_id:
            raise InvalidArgument("document_id", "must not be empty")
        shard = self.shards[shard_for(document_id, len(self.shards))]
        return (await shard.delete([document_id], deadline)).removed

    # ---- search -------------------------------------------------------------------------------
    def _top_k(self, top_k: int | None, default: int, limit: int) -> int:
        if top_k is None:
            return default
        if not 1 <= top_k <= limit:
            raise InvalidArgument("top_k", f"must be between 1 and {limit}, got {top_k}")
        return top_k

    async def search(self, query: str, top_k: int | None, deadline: Deadline) -> tuple[list[Hit], Timings]:
        if not query.strip():
            raise InvalidArgument("query", "must not be empty")
        k = self._top_k(top_k, self.config.default_top_k, self.config.max_top_k)
        timings = Timings()
        hits, _ = await self._retrieve(query, k, deadline, timings)
        return hits, timings

    async def _retrieve(self, query: str, k: int, deadline: Deadline, timings: Timings) -> tuple[list[Hit], np.ndarray]:
        clock = _Clock()
        vector = await self.embedder.embed([query], deadline)
        timings.embed_ms = clock.lap()
        replies = await asyncio.gather(
            *(shard.search(vector, k, max(self.config.ef, k), deadline) for shard in self.shards)
        )
        hits = [
            Hit(h.score, h.document_id, h.chunk_id, h.source, h.text, reply.shard_id)
            for reply in replies
            for h in reply.results[0].hits
        ]
        hits.sort(key=lambda h: h.score, reverse=True)
        timings.index_ms = clock.lap()
        timings.total_ms = clock.total()
        return hits[:k], vector[0]

    # ---- ask ----------------------------------------------------------------------------------
    async def ask(
        self,
        question: str,
        top_k: int | None,
        max_tokens: int | None,
        temperature: float | None,
        deadline: Deadline,
    ) -> AsyncIterator[AskSources | AskToken | AskDone]:
        """Sources first, then answer tokens as they are generated, then citations and timings."""
        if not question.strip():
            raise InvalidArgument("question", "must not be empty")
        k = self._top_k(top_k, self.config.ask_top_k, self.config.max_ask_top_k)
        if max_tokens is not None and not 1 <= max_tokens <= self.config.context_tokens // 2:
            raise InvalidArgument("max_tokens", f"must be between 1 and {self.config.context_tokens // 2}")
        if temperature is not None and not 0 <= temperature <= 2:
            raise InvalidArgument("temperature", "must be between 0 and 2")
        max_tokens = max_tokens or self.config.max_tokens
        clock, timings = _Clock(), Timings()
        hits, _ = await self._retrieve(question, k, deadline, timings)
        if not hits:
            raise FailedPrecondition("the collection is empty: ingest documents first")

        passages = [Passage(i + 1, h.source, h.text) for i, h in enumerate(hits)]
        budget = self.config.context_tokens - max_tokens
        messages, used = build_messages(question, passages, self.chunker.count, budget)
        sources = [(p.number, hits[p.number - 1]) for p in used]
        yield AskSources(sources)

        request = generator_pb2.GenerateRequest(
            messages=[generator_pb2.Message(**m) for m in messages],
            max_tokens=max_tokens,
            stop=STOP_SEQUENCES,
            temperature=self.config.temperature if temperature is None else temperature,
        )
        gen_start = time.perf_counter()
        answer, completion_tokens = [], 0
        async for reply in self.generator.generate(request, deadline):
            if reply.text:
                if not answer:
                    timings.time_to_first_token_ms = (time.perf_counter() - gen_start) * 1000
                answer.append(reply.text)
                yield AskToken(reply.text)
            if reply.HasField("usage"):
                completion_tokens = reply.usage.completion_tokens
        timings.generate_ms = (time.perf_counter() - gen_start) * 1000
        text = "".join(answer)
        citations = cited_numbers(text, len(sources)) or await self._attribute(text, sources, deadline)
        timings.total_ms = clock.total()
        yield AskDone(citations, timings, completion_tokens)

    async def _attribute(self, answer: str, sources: list[tuple[int, Hit]], deadline: Deadline) -> list[int]:
        """When the model cited nothing: the sources whose meaning is closest to the answer's."""
        if not answer.strip() or not sources:
            return []
        vectors = await self.embedder.embed([answer] + [hit.text for _, hit in sources], deadline)
        scores = vectors[1:] @ vectors[0]
        best = float(scores.max())
        if best < self.config.attribution_min_score:
            return []
        return [number for (number, _), s in sorted(zip(sources, scores), key=lambda x: -x[1])
                if s >= best - 0.05]

    async def close(self) -> None:
        await asyncio.gather(
            self.embedder.close(), self.generator.close(), *(s.close() for s in self.shards)
        )
