"""The cache in front of the flow: answers replayed, identical concurrent questions answered once,
query embeddings kept, and a tenant's entries invalidated by every write to it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import numpy as np
from opentelemetry import trace

from fabric.client import Deadline
from fabric.telemetry import span, tracer
from router.admission import AskGate
from router.cache import Cache, SingleFlight, cache_key
from router.clients import EmbedderClient
from router.domain import (
    AskDone, AskEvent, AskQuery, AskSources, AskToken, Coverage, DocumentInput, Hit, Ingested, SearchQuery, Support,
    Timings,
)
from router.evidence import Span
from router.metrics import DOWNSTREAM_CALLS
from router.rag import Rag

_tracer = tracer("ragloom.router")


class CachedQueryVectors:
    """Query embeddings through the cache: a tenant's repeated query costs no embedder call."""

    def __init__(self, embedder: EmbedderClient, cache: Cache):
        self.embedder, self.cache = embedder, cache

    async def cached(self, text: str, tenant: str = "") -> np.ndarray | None:
        # Per tenant: a hit is faster than a miss, so a shared entry would tell one tenant what another asked.
        found = await self.cache.get(cache_key("embedding", query=text, tenant=tenant))
        trace.get_current_span().set_attribute("ragloom.cache_hit", found is not None)
        if found is not None and len(found) % 4 == 0:
            return np.frombuffer(found, dtype=np.float32)[None, :]
        return None

    async def query(self, text: str, deadline: Deadline, tenant: str = "", looked_up: bool = False) -> np.ndarray:
        key = cache_key("embedding", query=text, tenant=tenant)
        if not looked_up and (vector := await self.cached(text, tenant)) is not None:
            return vector
        DOWNSTREAM_CALLS.labels("embedder").inc()
        vector = await self.embedder.embed([text], deadline)
        await self.cache.set(key, vector[0].astype(np.float32).tobytes())
        return vector


class CachedRag:
    """The flow's public operations with the answer cache and single-flight around them."""

    def __init__(self, rag: Rag, cache: Cache, gate: AskGate | None = None):
        self.rag, self.cache = rag, cache
        self.flights = SingleFlight()
        #: Sheds a new generation that would finish after its caller's deadline (a cached answer, or one
        #: joining a generation under way, costs the generator nothing and always passes).
        self.gate = gate or AskGate()

    # A write invalidates the tenant's cached answers once it has reached the shards, also when it
    # failed there (some shards may have written); one refused before that leaves them be.
    async def ingest(self, documents: list[DocumentInput], deadline: Deadline, tenant: str = "",
                     ) -> tuple[list[Ingested], Timings, dict[int, int]]:
        return await self.rag.ingest(documents, deadline, tenant, on_write=self.cache.invalidate)

    async def delete(self, document_id: str, deadline: Deadline, tenant: str = "") -> tuple[int, dict[int, int]]:
        return await self.rag.delete(document_id, deadline, tenant, on_write=self.cache.invalidate)

    async def search(self, query: SearchQuery, deadline: Deadline) -> tuple[list[Hit], Coverage, Timings]:
        return await self.rag.search(query, deadline)

    async def ask(self, query: AskQuery, deadline: Deadline) -> AsyncIterator[AskEvent]:
        """The flow's events; a cached answer is replayed, and identical concurrent questions share one
        generation. An answer from only some shards, or with a stage degraded, is not kept."""
        query = self.rag.resolve(query)
        generation = await self.cache.generation(query.scope.tenant)
        key = cache_key("answer", question=query.question, k=query.top_k, max_tokens=query.max_tokens,
                        temperature=query.temperature, tenant=query.scope.tenant, tags=sorted(query.scope.tags),
                        mode=query.mode, generation=generation, pipeline=self.rag.config.pipeline_key())
        if generation is not None and query.use_cache:
            with span(_tracer, "cache lookup") as current:
                cached = await self.cache.get(key)
                current.set_attribute("ragloom.cache_hit", cached is not None)
            if cached is not None:
                for event in replay(cached):
                    yield event
                return
        else:
            self.cache.bypassed()
        keep = generation is not None

        flight = f"{key}:{query.require_complete}"
        passage = None if self.flights.running(flight) else self.gate.admit(deadline.remaining())

        async def produce() -> AsyncIterator[AskEvent]:
            events = []
            try:
                async for event in self.rag.answer(query, deadline):
                    events.append(event)
                    if isinstance(event, AskDone):
                        self.gate.record(event.timings.total_ms, event.timings.generate_ms,
                                         event.timings.generator_queue_ms)
                        # Kept before the last event goes out: once every listener has it, the flight may end.
                        if keep and not events[0].coverage.partial and not event.degraded:
                            await self.cache.set(key, serialise(events))
                    yield event
            finally:
                if passage is not None:
                    passage.release()

        try:
            async for event in self.flights.join(flight, produce):
                yield event
        finally:
            if passage is not None:  # also when the generation never started (released once either way)
                passage.release()

    async def close(self) -> None:
        await self.rag.close()
        await self.cache.close()


def serialise(events: list[AskEvent]) -> bytes:
    """A finished answer's events as one cache entry."""
    first, done = events[0], events[-1]
    assert isinstance(first, AskSources) and isinstance(done, AskDone)
    return json.dumps({
        "answer": "".join(e.text for e in events if isinstance(e, AskToken)),
        "shards": first.coverage.answered,
        "sources": [[number, {**vars(hit), "evidence": [vars(e) for e in hit.evidence]}]
                    for number, hit in first.sources],
        "citations": done.citations,
        "completion_tokens": done.completion_tokens,
        "abstained": done.abstained,
        "extractive": done.extractive,
        "support": [[s.source, vars(s.span), s.text] for s in done.support],
    }).encode()


def replay(data: bytes) -> list[AskEvent]:
    """A cached answer as the events a fresh one would stream (timings show it cost nothing)."""
    record = json.loads(data)
    sources = [(number, Hit(**{**hit, "evidence": tuple(Span(**e) for e in hit.get("evidence", []))}))
               for number, hit in record["sources"]]
    support = [Support(n, Span(**span_), text) for n, span_, text in record.get("support", [])]
    return [
        AskSources(sources, Coverage(answered=record["shards"]), cached=True),
        AskToken(record["answer"]),
        AskDone(record["citations"], Timings(), record["completion_tokens"], record.get("abstained", False),
                support, record.get("extractive", False)),
    ]
