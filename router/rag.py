"""The RAG flow, free of gRPC servicer concerns: ingest, search and ask over the mesh clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

import grpc

from fabric.client import Deadline
from fabric.errors import FailedPrecondition, InvalidArgument, Overloaded, Unavailable
from ragloom.generator.v1 import generator_pb2
from ragloom.indexer.v1 import indexer_pb2
from router.cache import Cache, SingleFlight, cache_key
from router.chunking import Chunker
from router.clients import EmbedderClient, GeneratorClient
from router.metrics import DOWNSTREAM_CALLS, PARTIAL_RESULTS, STAGE_SECONDS, TIME_TO_FIRST_TOKEN, VERIFIED_SENTENCES
from router.metrics import ABSTENTIONS
from router.parsing import format_for, parse, title_for
from router.evidence import EvidenceConfig, Sentence, Span, combine, grounded_messages, quote, quoted, select
from router.evidence import STOP_SEQUENCES as GROUNDED_STOP_SEQUENCES
from router.prompt import STOP_SEQUENCES, Passage, build_messages, cited_numbers
from router.sharding import shard_for
from router.topology import ShardGroup, VersionClock
from router.verify import Verdict, Verifier, VerifierConfig, split_sentences
from fabric.telemetry import span, tracer

_tracer = tracer("ragloom.router")
log = logging.getLogger(__name__)

ABSTENTION = "The documents do not answer this question; the closest passages are listed as sources."


@dataclass(frozen=True)
class Scope:
    """Whose documents a request may see: one tenant, optionally only chunks with one of `tags`."""

    tenant: str = ""
    tags: tuple[str, ...] = ()


@dataclass
class Coverage:
    answered: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.failed)

    def merge(self, other: "Coverage") -> "Coverage":
        """Shards that answered both retrievals; a shard that failed either counts as failed."""
        failed = sorted(set(self.failed) | set(other.failed))
        return Coverage(sorted((set(self.answered) | set(other.answered)) - set(failed)), failed)


@dataclass
class DocumentInput:
    id: str
    source: str
    body: str | bytes
    format: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


MODES = ("dense", "lexical", "hybrid")
RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion


def fuse_reciprocal_rank(rankings: list[list[Hit]]) -> list[Hit]:
    """Reciprocal rank fusion: each list adds 1 / (RRF_K + rank) to a chunk's score; best first."""
    fused: dict[str, Hit] = {}
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            fused.setdefault(hit.chunk_id, hit)
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    order = sorted(scores, key=lambda chunk_id: -scores[chunk_id])
    return [Hit(scores[c], fused[c].document_id, c, fused[c].source, fused[c].text, fused[c].shard_id) for c in order]


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
    #: After reranking: the passage's sentences that best answer the question, best first.
    evidence: tuple[Span, ...] = ()


@dataclass
class Timings:
    embed_ms: float = 0.0
    index_ms: float = 0.0
    generate_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    parse_ms: float = 0.0
    rerank_ms: float = 0.0
    verify_ms: float = 0.0


@dataclass
class AskSources:
    sources: list[tuple[int, Hit]]
    coverage: Coverage
    cached: bool = False


@dataclass
class AskToken:
    text: str


@dataclass(frozen=True)
class Support:
    """The stretch of a cited source's text that supports the answer."""

    source: int
    span: Span
    text: str


@dataclass
class AskDone:
    citations: list[int]
    timings: Timings
    completion_tokens: int
    abstained: bool = False
    support: list[Support] = field(default_factory=list)
    extractive: bool = False




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
    max_inflight: int = 64
    retrieval_mode: str = "hybrid"
    # Citation fallback: when the model writes no [n] markers, sources this close to the answer are cited.
    attribution_min_score: float = 0.45
    # Reranking: candidates retrieved and reranked for Ask (and for Search with rerank), and whether Ask and
    # Search rerank when the request does not say.
    rerank_candidates: int = 12
    rerank_ask: bool = True
    rerank_search: bool = False
    # "evidence": the best sentences, numbered (the default); "passages": whole passages as before reranking.
    prompt: str = "evidence"
    # Check every answer sentence against the evidence, dropping what is unsupported.
    verify: bool = True
    # Abstain when the best reranked score is below this (fitted on the labelled set); None: never abstain.
    abstain_below: float | None = 0.55
    # When no generated sentence is supported, the evidence is quoted if the best passage scores at least
    # this; below it the ask abstains (weak evidence and an answer that cannot be verified).
    quote_min_score: float = 0.0
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)


class Rag:
    def __init__(
        self,
        config: RagConfig,
        chunker: Chunker,
        embedder: EmbedderClient,
        shards: list[ShardGroup],
        generator: GeneratorClient,
        cache: Cache,
    ):
        self.config = config
        self.chunker = chunker
        self.embedder = embedder
        self.shards = shards
        self.generator = generator
        self.cache = cache
        self.flights = SingleFlight()
        self.versions = VersionClock()
        self.inflight = 0

    def admit(self) -> "_Admission":
        """Bounded concurrency: past `max_inflight` requests, refuse with RESOURCE_EXHAUSTED at once."""
        return _Admission(self)

    # ---- ingest -------------------------------------------------------------------------------
    async def ingest(
        self, documents: list[DocumentInput], deadline: Deadline, tenant: str = ""
    ) -> tuple[list[Ingested], Timings]:
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

        # Each chunk is embedded with its document's title in front (the stored text stays as it is).
        texts = [_titled(title_for(doc.source or doc_id), text)
                 for doc, doc_id, chunks in zip(documents, ids, chunked) for text in chunks]
        DOWNSTREAM_CALLS.labels("embedder").inc()
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
                        metadata=metadata, vector=vectors[row], tenant=tenant, tags=doc.tags,
                    )
                )
                row += 1
            results.append(Ingested(id=doc_id, chunks=len(chunks), shard_id=shard))
        version = self.versions.next()
        try:
            replies = await asyncio.gather(*(
                self.shards[shard].write(lambda client, c=chunks: client.upsert(c, version, deadline))
                for shard, chunks in per_shard.items()
            ))
        finally:
            await self.cache.invalidate(tenant)  # also after a partial failure: some shards may have written
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

    async def delete(self, document_id: str, deadline: Deadline, tenant: str = "") -> int:
        if not document_id:
            raise InvalidArgument("document_id", "must not be empty")
        shard = self.shards[shard_for(document_id, len(self.shards))]
        version = self.versions.next()
        try:
            reply = await shard.write(lambda client: client.delete([document_id], tenant, version, deadline))
        finally:
            await self.cache.invalidate(tenant)
        return reply.removed

    # ---- search -------------------------------------------------------------------------------
    def _top_k(self, top_k: int | None, default: int, limit: int) -> int:
        if top_k is None:
            return default
        if not 1 <= top_k <= limit:
            raise InvalidArgument("top_k", f"must be between 1 and {limit}, got {top_k}")
        return top_k

    async def search(
        self, query: str, top_k: int | None, deadline: Deadline, scope: Scope = Scope(), require_complete: bool = False,
        mode: str = "", rerank: bool | None = None,
    ) -> tuple[list[Hit], Coverage, Timings]:
        if not query.strip():
            raise InvalidArgument("query", "must not be empty")
        k = self._top_k(top_k, self.config.default_top_k, self.config.max_top_k)
        rerank = self.config.rerank_search if rerank is None else rerank
        clock, timings = _Clock(), Timings()
        depth = max(k, self.config.rerank_candidates) if rerank else k
        hits, coverage = await self._retrieve(query, depth, scope, require_complete, deadline, timings, mode)
        if rerank and hits:
            hits = await self._rerank(query, hits, deadline, timings)
        timings.total_ms = clock.total()
        return hits[:k], coverage, timings

    async def _rerank(self, query: str, hits: list[Hit], deadline: Deadline, timings: Timings) -> list[Hit]:
        """Candidates best first by how well they answer `query` (the embedder's Rerank), each with its best
        sentences; the retrieval rank adds a small prior. Scores become the combined rerank score."""
        clock = _Clock()
        with span(_tracer, "rerank", **{"ragloom.candidates": len(hits)}):
            DOWNSTREAM_CALLS.labels("embedder").inc()
            scored = await self.embedder.rerank(query, [h.text for h in hits], deadline,
                                                titles=[title_for(h.source) for h in hits])
        ranked = combine(scored, self.config.evidence.prior_weight)
        timings.rerank_ms = clock.lap()
        STAGE_SECONDS.labels("rerank").observe(timings.rerank_ms / 1000)
        return [Hit(r.score, hits[r.index].document_id, hits[r.index].chunk_id, hits[r.index].source,
                    hits[r.index].text, hits[r.index].shard_id, r.spans) for r in ranked]

    async def _embed_query(self, query: str, deadline: Deadline) -> np.ndarray:
        with span(_tracer, "embed query") as current:
            key = cache_key("embedding", query=query)
            cached = await self.cache.get(key)
            current.set_attribute("ragloom.cache_hit", cached is not None)
            if cached is not None and len(cached) % 4 == 0:
                return np.frombuffer(cached, dtype=np.float32)[None, :]
            DOWNSTREAM_CALLS.labels("embedder").inc()
            vector = await self.embedder.embed([query], deadline)
            await self.cache.set(key, vector[0].astype(np.float32).tobytes())
            return vector

    async def _retrieve(
        self, query: str, k: int, scope: Scope, require_complete: bool, deadline: Deadline, timings: Timings,
        mode: str = "",
    ) -> tuple[list[Hit], Coverage]:
        """Top-k chunks for `query`: dense (embedding), lexical (BM25) or hybrid (both, fused by reciprocal rank)."""
        mode = mode or self.config.retrieval_mode
        if mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        clock = _Clock()
        # Hybrid fuses two longer lists: a chunk ranked just below k by one method can win on the other.
        depth = k if mode != "hybrid" else min(max(2 * k, 20), self.config.max_top_k)
        lexical = (asyncio.ensure_future(self._fan_out(
            "lexical", lambda c: c.lexical_search([query], depth, scope, deadline), scope, require_complete, deadline))
            if mode != "dense" else None)
        try:
            dense = None
            if mode != "lexical":
                vector = await self._embed_query(query, deadline)
                timings.embed_ms = clock.lap()
                ef = max(self.config.ef, depth)
                dense = await self._fan_out(
                    "dense", lambda c: c.search(vector, depth, ef, scope.tenant, scope.tags, deadline),
                    scope, require_complete, deadline)
            lexical_result = await lexical if lexical is not None else None
        except BaseException:
            if lexical is not None:
                lexical.cancel()
            raise
        if mode == "hybrid":
            hits, coverage = fuse_reciprocal_rank([dense[0], lexical_result[0]]), dense[1].merge(lexical_result[1])
        else:
            hits, coverage = dense if mode == "dense" else lexical_result
        timings.index_ms = clock.lap()
        STAGE_SECONDS.labels("embedding").observe(timings.embed_ms / 1000)
        STAGE_SECONDS.labels("retrieval").observe(timings.index_ms / 1000)
        return hits[:k], coverage

    async def _fan_out(self, kind: str, call, scope: Scope, require_complete: bool, deadline: Deadline):
        """`call` on every shard (one replica each, failing over), merged best first, with who answered."""
        DOWNSTREAM_CALLS.labels("indexer").inc()

        async def one(group: ShardGroup):
            with span(_tracer, "search shard", **{"ragloom.shard": group.shard_id, "ragloom.retrieval": kind}):
                return await group.read(call, deadline)

        replies = await asyncio.gather(*(one(g) for g in self.shards), return_exceptions=True)
        coverage, hits = Coverage(), []
        for group, reply in zip(self.shards, replies):
            if isinstance(reply, BaseException):
                if isinstance(reply, grpc.aio.AioRpcError) and reply.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise reply
                if not isinstance(reply, (grpc.aio.AioRpcError, Unavailable)):
                    raise reply
                coverage.failed.append(group.shard_id)
                PARTIAL_RESULTS.labels(str(group.shard_id)).inc()
                continue
            coverage.answered.append(group.shard_id)
            hits.extend(Hit(h.score, h.document_id, h.chunk_id, h.source, h.text, group.shard_id)
                        for h in reply.results[0].hits)
        if coverage.failed and (require_complete or not coverage.answered):
            raise Unavailable(f"shards {coverage.failed} did not answer in time; "
                              f"{len(coverage.answered)} of {len(self.shards)} did")
        hits.sort(key=lambda h: h.score, reverse=True)
        return hits, coverage

    # ---- ask ----------------------------------------------------------------------------------
    async def ask(
        self,
        question: str,
        top_k: int | None,
        max_tokens: int | None,
        temperature: float | None,
        deadline: Deadline,
        scope: Scope = Scope(),
        require_complete: bool = False,
        use_cache: bool = True,
        mode: str = "",
    ) -> AsyncIterator[AskSources | AskToken | AskDone]:
        """Sources first, then answer tokens as they are generated, then citations and timings.

        A cached answer is replayed; identical concurrent questions share one generation."""
        if not question.strip():
            raise InvalidArgument("question", "must not be empty")
        k = self._top_k(top_k, self.config.ask_top_k, self.config.max_ask_top_k)
        if max_tokens is not None and not 1 <= max_tokens <= self.config.context_tokens // 2:
            raise InvalidArgument("max_tokens", f"must be between 1 and {self.config.context_tokens // 2}")
        if temperature is not None and not 0 <= temperature <= 2:
            raise InvalidArgument("temperature", "must be between 0 and 2")
        max_tokens = max_tokens or self.config.max_tokens
        temperature = self.config.temperature if temperature is None else temperature
        generation = await self.cache.generation(scope.tenant)
        mode = mode or self.config.retrieval_mode
        key = cache_key("answer", question=question.strip(), k=k, max_tokens=max_tokens, temperature=temperature,
                        tenant=scope.tenant, tags=sorted(scope.tags), mode=mode, generation=generation,
                        pipeline=self._pipeline_key())
        if generation is not None and use_cache:
            with span(_tracer, "cache lookup") as current:
                cached = await self.cache.get(key)
                current.set_attribute("ragloom.cache_hit", cached is not None)
            if cached is not None:
                for event in _replay(cached):
                    yield event
                return
        else:
            self.cache.bypassed()
        produce = lambda: self._answer(question, k, max_tokens, temperature, scope, require_complete, deadline,
                                       key if generation is not None else None, mode)
        async for event in self.flights.join(f"{key}:{require_complete}", produce):
            yield event

    def _pipeline_key(self) -> str:
        c = self.config
        return f"{c.rerank_ask}:{c.prompt}:{c.verify}:{c.abstain_below}:{c.quote_min_score}:{c.evidence}:{c.verifier}"

    async def _answer(
        self, question: str, k: int, max_tokens: int, temperature: float, scope: Scope,
        require_complete: bool, deadline: Deadline, cache_as: str | None, mode: str,
    ) -> AsyncIterator[AskSources | AskToken | AskDone]:
        """Retrieve wide → rerank → abstain on weak evidence, or prompt with the best sentences → stream the
        sentences that the evidence supports (or quote the evidence when none is) → cite what was used."""
        config, clock, timings = self.config, _Clock(), Timings()
        depth = max(k, config.rerank_candidates) if config.rerank_ask else k
        hits, coverage = await self._retrieve(question, depth, scope, require_complete, deadline, timings, mode)
        if not hits:
            raise FailedPrecondition("no documents to answer from: ingest documents first"
                                     + (f" (tenant {scope.tenant!r})" if scope.tenant else ""))
        if config.rerank_ask:
            hits = await self._rerank(question, hits, deadline, timings)
        sources = [(i + 1, hit) for i, hit in enumerate(hits[:k])]
        answer = _Answer(clock, timings)

        if config.rerank_ask and config.abstain_below is not None and hits[0].score < config.abstain_below:
            yield AskSources(sources, coverage)
            yield answer.emit(ABSTENTION)
            yield await self._finish(answer, sources, coverage, cache_as, abstained=True)
            return

        with span(_tracer, "build prompt") as current:
            if config.prompt == "passages":
                passages = [Passage(n, h.source, h.text) for n, h in sources]
                messages, used = build_messages(question, passages, self.chunker.count, config.context_tokens - max_tokens)
                sources = [(p.number, hits[p.number - 1]) for p in used]
                evidence = [Sentence(n, Span(0, len(h.text)), h.text) for n, h in sources]
                stop = STOP_SEQUENCES
            else:
                evidence = select([(n, h.text, h.evidence or (Span(0, len(h.text)),)) for n, h in sources],
                                  config.evidence, self.chunker.count)
                messages, stop = grounded_messages(question, evidence), GROUNDED_STOP_SEQUENCES
            current.set_attribute("ragloom.evidence_sentences", len(evidence))
        yield AskSources(sources, coverage)

        request = generator_pb2.GenerateRequest(
            messages=[generator_pb2.Message(**m) for m in messages], max_tokens=max_tokens, stop=stop,
            temperature=temperature,
        )
        verifier = Verifier(question, evidence, config.verifier) if config.verify else None
        check = _SentenceCheck(verifier, self.embedder, deadline) if verifier else None
        pending, said = "", []
        DOWNSTREAM_CALLS.labels("generator").inc()
        gen_start = time.perf_counter()
        with span(_tracer, "generate") as current:
            async for reply in self.generator.generate(request, deadline):
                if reply.HasField("usage"):
                    answer.completion_tokens = reply.usage.completion_tokens
                if not reply.text:
                    continue
                if not said:
                    current.add_event("first token")
                    current.set_attribute("ragloom.time_to_first_token_ms", (time.perf_counter() - gen_start) * 1000)
                said.append(reply.text)
                if check is None:
                    yield answer.emit(reply.text)
                    continue
                sentences, pending = split_sentences(pending + reply.text)
                for sentence in sentences:
                    if (kept := await check.keep(sentence, timings)) is not None:
                        yield answer.emit(kept, sentence=True)
            if check is not None and pending.strip() and (kept := await check.keep(pending, timings)) is not None:
                yield answer.emit(kept, sentence=True)
            current.set_attribute("ragloom.completion_tokens", answer.completion_tokens)
        timings.generate_ms = (time.perf_counter() - gen_start) * 1000
        STAGE_SECONDS.labels("generation").observe(timings.generate_ms / 1000)

        text = "".join(said)
        if check is None:
            answer.citations = cited_numbers(text, len(sources)) or await self._attribute(text, sources, deadline)
        elif check.kept:
            answer.citations = list(dict.fromkeys(v.source for v in check.kept))
            answer.support = [Support(v.source, v.support.span, v.support.text) for v in check.kept if v.support]
        elif evidence and config.rerank_ask and hits[0].score < config.quote_min_score:
            # Nothing the model said survived and the evidence is not strong enough to quote on its own.
            yield answer.emit(ABSTENTION)
            yield await self._finish(answer, sources, coverage, cache_as, abstained=True)
            return
        elif evidence:
            # Nothing the model said survived: the best evidence, quoted, is the answer.
            yield answer.emit(quote(evidence), sentence=True)
            answer.extractive = True
            answer.support = [Support(s.number, s.span, s.text) for s in quoted(evidence)]
            answer.citations = [answer.support[0].source]
        yield await self._finish(answer, sources, coverage, cache_as)

    async def _finish(self, answer: "_Answer", sources: list[tuple[int, Hit]], coverage: Coverage,
                      cache_as: str | None, abstained: bool = False) -> AskDone:
        """The last event of an ask, counted and kept in the cache (unless only some shards answered)."""
        done = answer.done(abstained)
        if abstained:
            ABSTENTIONS.inc()
        elif done.timings.time_to_first_token_ms:
            TIME_TO_FIRST_TOKEN.observe(done.timings.time_to_first_token_ms / 1000)
        if cache_as is not None and not coverage.partial:
            await self.cache.set(cache_as, _serialise(answer.text, sources, coverage, done))
        return done

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
            self.embedder.close(), self.generator.close(), *(s.close() for s in self.shards), self.cache.close()
        )


def _titled(title: str, text: str) -> str:
    return f"{title}: {text}" if title else text


class _Admission:
    def __init__(self, rag: Rag):
        self.rag = rag

    def __enter__(self):
        if self.rag.inflight >= self.rag.config.max_inflight:
            raise Overloaded(f"router has {self.rag.inflight} requests in flight; retry shortly", retry_after_s=0.5)
        self.rag.inflight += 1

    def __exit__(self, *exc):
        self.rag.inflight -= 1


def _serialise(answer: str, sources: list[tuple[int, Hit]], coverage: Coverage, done: AskDone) -> bytes:
    return json.dumps({
        "answer": answer,
        "shards": coverage.answered,
        "sources": [[number, {**vars(hit), "evidence": [vars(e) for e in hit.evidence]}] for number, hit in sources],
        "citations": done.citations,
        "completion_tokens": done.completion_tokens,
        "abstained": done.abstained,
        "extractive": done.extractive,
        "support": [[s.source, vars(s.span), s.text] for s in done.support],
    }).encode()


def _replay(data: bytes) -> list[AskSources | AskToken | AskDone]:
    """A cached answer as the events a fresh one would stream (timings show it cost nothing)."""
    record = json.loads(data)
    sources = [(number, Hit(**{**hit, "evidence": tuple(Span(**e) for e in hit.get("evidence", []))}))
               for number, hit in record["sources"]]
    support = [Support(n, Span(**span), text) for n, span, text in record.get("support", [])]
    return [
        AskSources(sources, Coverage(answered=record["shards"]), cached=True),
        AskToken(record["answer"]),
        AskDone(record["citations"], Timings(), record["completion_tokens"], record.get("abstained", False),
                support, record.get("extractive", False)),
    ]


class _Answer:
    """The answer as it is sent: its text so far, when the first of it went out, what it cites."""

    def __init__(self, clock: _Clock, timings: Timings):
        self.clock, self.timings = clock, timings
        self.parts: list[str] = []
        self.citations: list[int] = []
        self.support: list[Support] = []
        self.completion_tokens = 0
        self.extractive = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def emit(self, text: str, sentence: bool = False) -> AskToken:
        """`text` as the next event; a whole `sentence` is set off from the one before by a space."""
        if not self.parts:
            self.timings.time_to_first_token_ms = self.clock.total()
        elif sentence:
            text = " " + text
        self.parts.append(text)
        return AskToken(text)

    def done(self, abstained: bool = False) -> AskDone:
        self.timings.total_ms = self.clock.total()
        return AskDone(self.citations, self.timings, self.completion_tokens, abstained, self.support,
                       self.extractive)


class _SentenceCheck:
    """Verifies the answer sentence by sentence; embeds (for the paraphrase test) only when words alone
    cannot decide."""

    def __init__(self, verifier: Verifier, embedder: EmbedderClient, deadline: Deadline):
        self.verifier, self.embedder, self.deadline = verifier, embedder, deadline
        self.kept: list[Verdict] = []
        self._evidence_vectors: np.ndarray | None = None

    async def keep(self, sentence: str, timings: Timings) -> str | None:
        """The sentence as it should be sent (its citation attached), or None when it is dropped."""
        start = time.perf_counter()
        try:
            verdict = self.verifier.check(sentence)
            # Words decide alone only against: a sentence they accept, or might as a paraphrase, is also
            # compared by meaning with its evidence (one embedding of the sentence).
            if verdict.supported or verdict.overlap >= self.verifier.config.min_paraphrase_overlap:
                verdict = self.verifier.check(sentence, await self._similarity(verdict.sentence))
        finally:
            timings.verify_ms += (time.perf_counter() - start) * 1000
        VERIFIED_SENTENCES.labels("kept" if verdict.supported else "dropped").inc()
        if not verdict.supported:
            log.debug("dropped %r: %s", verdict.sentence, verdict.reason)
            return None
        self.kept.append(verdict)
        return f"{verdict.sentence} [{verdict.source}]"

    async def _similarity(self, sentence: str) -> list[float]:
        texts = [s.text for s in self.verifier.evidence]
        if self._evidence_vectors is None:
            vectors = await self.embedder.embed([sentence, *texts], self.deadline)
            self._evidence_vectors, query = vectors[1:], vectors[0]
        else:
            query = (await self.embedder.embed([sentence], self.deadline))[0]
        return (self._evidence_vectors @ query).tolist()
