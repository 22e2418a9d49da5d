"""The RAG flow, free of gRPC servicer and cache concerns: ingest, search and ask over the mesh clients.

An ask: retrieve wide → rerank → abstain on weak evidence, or prompt with the best sentences → stream
the sentences the evidence supports (or quote the evidence when none is) → cite what was used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from fabric.client import Deadline
from fabric.errors import FailedPrecondition, InvalidArgument, code_of, is_dependency_failure
from fabric.telemetry import span, tracer
from router import reread
from router.chunking import Chunker
from router.clients import EmbedderClient, GeneratorClient
from router.clock import Clock
from router.config import RagConfig
from router.domain import (
    ABSTENTION, AskDone, AskEvent, AskQuery, AskSources, AskToken, Coverage, DocumentInput, Hit, Ingested,
    SearchQuery, Support, Timings,
)
from router.evidence import STOP_SEQUENCES as GROUNDED_STOP_SEQUENCES
from router.evidence import Sentence, Span, grounded_messages, quote, quoted, select
from router.ingest import Ingestion, OnWrite, Writes
from router.metrics import (
    ABSTENTIONS, DEGRADED, DOWNSTREAM_CALLS, STAGE_SECONDS, TIME_TO_FIRST_TOKEN, VERIFIED_SENTENCES,
)
from router.prompt import STOP_SEQUENCES, Passage, build_messages, cited_numbers
from router.retrieval import Floors, QueryVectors, Retriever, why
from router.topology import ShardGroup
from router.verify import Verdict, Verifier, split_sentences

_tracer = tracer("ragloom.router")
log = logging.getLogger(__name__)


class Rag:
    def __init__(self, config: RagConfig, chunker: Chunker, embedder: EmbedderClient, shards: list[ShardGroup],
                 generator: GeneratorClient, vectors: QueryVectors | None = None, writes: Writes | None = None):
        self.config = config
        self.chunker = chunker
        self.embedder = embedder
        self.shards = shards
        self.generator = generator
        self.ingestion = Ingestion(config, chunker, embedder, shards, writes)
        self.retriever = Retriever(config, embedder, shards, vectors)

    # ---- writes -------------------------------------------------------------------------------
    async def ingest(self, documents: list[DocumentInput], deadline: Deadline, tenant: str = "",
                     on_write: OnWrite | None = None) -> tuple[list[Ingested], Timings, dict[int, int]]:
        """The documents written; per shard written, the log sequence of the write (none without a log)."""
        return await self.ingestion.ingest(documents, deadline, tenant, on_write)

    async def delete(self, document_id: str, deadline: Deadline, tenant: str = "",
                     on_write: OnWrite | None = None) -> tuple[int, dict[int, int]]:
        return await self.ingestion.delete(document_id, deadline, tenant, on_write)

    def floors(self, requested: dict[int, int]) -> Floors:
        """Per shard, the log sequence a read must see: the caller's tokens, and what this router wrote."""
        return Floors(strict=dict(requested), soft=dict(self.ingestion.written))

    # ---- search -------------------------------------------------------------------------------
    @staticmethod
    def _top_k(top_k: int | None, default: int, limit: int) -> int:
        if top_k is None:
            return default
        if not 1 <= top_k <= limit:
            raise InvalidArgument("top_k", f"must be between 1 and {limit}, got {top_k}")
        return top_k

    def check_length(self, field: str, text: str) -> None:
        """INVALID_ARGUMENT for a question or query past the token limit, decided before any model work:
        a text of more than 100 characters a token (WordPiece's longest word) is refused unread."""
        limit = self.config.max_question_tokens
        if len(text) > 100 * limit or self.chunker.count(text) > limit:
            raise InvalidArgument(field, f"is longer than the limit of {limit} tokens (the router's "
                                         f"--max-question-tokens); ask about a shorter text")

    async def search(self, query: SearchQuery, deadline: Deadline) -> tuple[list[Hit], Coverage, Timings]:
        if not query.query.strip():
            raise InvalidArgument("query", "must not be empty")
        self.check_length("query", query.query)
        k = self._top_k(query.top_k, self.config.default_top_k, self.config.max_top_k)
        rerank = self.config.rerank_search if query.rerank is None else query.rerank
        clock = Clock()
        depth = max(k, self.config.rerank_candidates) if rerank else k
        found = await self.retriever.retrieve(query.query, depth, query.scope, query.require_complete, deadline, query.mode,
                                              self.floors(query.min_sequences),
                                              reserved=self.config.rerank_reserved if rerank else 0)
        timings, hits = Timings(embed_ms=found.embed_ms, index_ms=found.index_ms), found.hits
        if rerank and hits:
            hits, timings.rerank_ms = await self.retriever.rerank(query.query, hits, deadline)
        timings.total_ms = clock.total()
        return hits[:k], found.coverage, timings

    # ---- ask ----------------------------------------------------------------------------------
    def resolve(self, query: AskQuery) -> AskQuery:
        """The query checked, with the router's defaults in place of what it leaves unset."""
        if not query.question.strip():
            raise InvalidArgument("question", "must not be empty")
        self.check_length("question", query.question)
        k = self._top_k(query.top_k, self.config.ask_top_k, self.config.max_ask_top_k)
        limit = self.config.context_tokens // 2
        if query.max_tokens is not None and not 1 <= query.max_tokens <= limit:
            raise InvalidArgument("max_tokens", f"must be between 1 and {limit}")
        if query.temperature is not None and not 0 <= query.temperature <= 2:
            raise InvalidArgument("temperature", "must be between 0 and 2")
        return dataclasses.replace(
            query, question=query.question.strip(), top_k=k, max_tokens=query.max_tokens or self.config.max_tokens,
            temperature=self.config.temperature if query.temperature is None else query.temperature,
            mode=query.mode or self.config.retrieval_mode,
        )

    def ask(self, query: AskQuery, deadline: Deadline) -> AsyncIterator[AskEvent]:
        """Sources first, then answer tokens as they are generated, then citations and timings (AskDone)."""
        return self.answer(self.resolve(query), deadline)

    async def answer(self, query: AskQuery, deadline: Deadline) -> AsyncIterator[AskEvent]:
        """`ask` for a query `resolve` has already checked and completed."""
        config, clock, timings = self.config, Clock(), Timings()
        k = query.top_k
        depth = max(k, config.rerank_candidates) if config.rerank_ask else k
        found = await self.retriever.retrieve(query.question, depth, query.scope, query.require_complete, deadline,
                                              query.mode, self.floors(query.min_sequences),
                                              reserved=config.rerank_reserved if config.rerank_ask else 0)
        timings.embed_ms, timings.index_ms = found.embed_ms, found.index_ms
        hits, coverage = found.hits, found.coverage
        if not hits:
            raise FailedPrecondition("no documents to answer from: ingest documents first"
                                     + (f" (tenant {query.scope.tenant!r})" if query.scope.tenant else ""))
        answer = _Answer(clock, timings, coverage.degraded)
        reranked = False
        if config.rerank_ask:
            try:
                hits, timings.rerank_ms = await self.retriever.rerank(query.question, hits, deadline)
                reranked = True
            except Exception as exc:
                if not is_dependency_failure(exc):
                    raise
                # The retrieval order stands; without rerank scores there is no evidence to abstain on.
                answer.degrade("rerank", f"rerank: the embedder failed ({why(exc)}); retrieval order, no abstention")
        if reranked and config.abstain_below is not None and relevance(hits[:k]) < config.abstain_below:
            yield AskSources([(i + 1, hit) for i, hit in enumerate(hits[:k])], coverage)
            yield answer.emit(ABSTENTION)
            yield _finish(answer, abstained=True)
            return
        if reranked and config.reread.sentences:
            hits, lift = await self._reread(query.question, hits, deadline, answer)
            if lift is not None and config.reread.abstain_below is not None and lift < config.reread.abstain_below:
                # The sentence the answer would be built from explains the question no better than its title.
                yield AskSources([(i + 1, hit) for i, hit in enumerate(hits[:k])], coverage)
                yield answer.emit(ABSTENTION)
                yield _finish(answer, abstained=True)
                return
        sources = [(i + 1, hit) for i, hit in enumerate(hits[:k])]

        with span(_tracer, "build prompt") as current:
            if config.prompt == "passages":
                passages = [Passage(n, h.source, h.text) for n, h in sources]
                messages, used = build_messages(query.question, passages, self.chunker.count,
                                                config.context_tokens - query.max_tokens)
                sources = [(p.number, hits[p.number - 1]) for p in used]
                evidence = [Sentence(n, Span(0, len(h.text)), h.text) for n, h in sources]
                stop = STOP_SEQUENCES
            else:
                evidence = select([(n, h.text, h.evidence or (Span(0, len(h.text)),)) for n, h in sources],
                                  config.evidence, self.chunker.count)
                messages, stop = grounded_messages(query.question, evidence), GROUNDED_STOP_SEQUENCES
            current.set_attribute("ragloom.evidence_sentences", len(evidence))
        yield AskSources(sources, coverage)

        verifier = Verifier(query.question, evidence, config.verifier) if config.verify else None
        check = _SentenceCheck(verifier, self.embedder, deadline, answer) if verifier else None
        pending, said = "", []
        DOWNSTREAM_CALLS.labels("generator").inc()
        gen_start = time.perf_counter()
        with span(_tracer, "generate") as current:
            async for piece in self.generator.generate(messages, query.max_tokens, stop, query.temperature, deadline):
                if piece.completion_tokens is not None:
                    answer.completion_tokens = piece.completion_tokens
                    timings.generator_queue_ms = piece.queue_ms
                if not piece.text:
                    continue
                if not said:
                    current.add_event("first token")
                    current.set_attribute("ragloom.time_to_first_token_ms", (time.perf_counter() - gen_start) * 1000)
                said.append(piece.text)
                if check is None:
                    yield answer.emit(piece.text)
                    continue
                sentences, pending = split_sentences(pending + piece.text)
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
            answer.citations = cited_numbers(text, len(sources)) or await self._attribute(text, sources, deadline,
                                                                                          answer)
        elif check.kept:
            answer.citations = list(dict.fromkeys(v.source for v in check.kept))
            answer.support = [Support(v.source, v.support.span, v.support.text) for v in check.kept if v.support]
        elif evidence and reranked and hits[0].score < config.quote_min_score:
            # Nothing the model said survived and the evidence is not strong enough to quote on its own.
            yield answer.emit(ABSTENTION)
            yield _finish(answer, abstained=True)
            return
        elif evidence:
            # Nothing the model said survived: the best evidence, quoted, is the answer.
            yield answer.emit(quote(evidence), sentence=True)
            answer.extractive = True
            answer.support = [Support(s.number, s.span, s.text) for s in quoted(evidence)]
            answer.citations = [answer.support[0].source]
        yield _finish(answer)

    async def _reread(self, question: str, hits: list[Hit], deadline: Deadline,
                      sent: "_Answer") -> tuple[list[Hit], float | None]:
        """`hits` re-ordered by the generator's model reading their best sentences (router/reread.py), with the
        lift of the sentence now first; as they are, and no lift, when the generator cannot score
        (UNIMPLEMENTED: said nowhere, it is the backend's nature) or fails."""
        config = self.config.reread
        read = reread.pool(hits, config.sentences)
        if len(read) < 2:
            return hits, None
        clock = Clock()
        contexts = reread.prompts(hits, read)
        try:
            with span(_tracer, "reread", **{"ragloom.sentences": len(read)}) as current:
                # The titles read alone give the lift: for the gate, or for whoever traces or debugs the asks.
                judged = (config.abstain_below is not None or current.is_recording()
                          or log.isEnabledFor(logging.DEBUG))
                baselines = reread.baselines(hits, read) if judged else []
                DOWNSTREAM_CALLS.labels("generator").inc()
                reading = await self.generator.score(contexts + baselines, question, deadline,
                                                     timeout_s=config.timeout_s)
                logprobs = reading.mean_logprob[: len(read)]
                out = reread.rescore(hits, read, logprobs, config.weight)
                lift = reread.lift(hits, read, logprobs, reading.mean_logprob[len(read):],
                                   reading.continuation_tokens, out[0]) if judged else None
                if lift is not None:
                    current.set_attribute("ragloom.lift", lift)
                    log.debug("reread: lift %.2f nats (abstain below %s)", lift, config.abstain_below)
        except Exception as exc:
            if code_of(exc) is grpc.StatusCode.UNIMPLEMENTED:
                return hits, None
            if not is_dependency_failure(exc):
                raise
            sent.degrade("reread", f"reread: the generator failed ({why(exc)}); the reranker's order")
            return hits, None
        finally:
            sent.timings.reread_ms = clock.lap()
            STAGE_SECONDS.labels("reread").observe(sent.timings.reread_ms / 1000)
        return out, lift

    async def _attribute(self, answer: str, sources: list[tuple[int, Hit]], deadline: Deadline,
                         sent: "_Answer") -> list[int]:
        """When the model cited nothing: the sources whose meaning is closest to the answer's (by shared
        words when the embedder fails: the answer is never lost for its citations)."""
        if not answer.strip() or not sources:
            return []
        try:
            vectors = await self.embedder.embed([answer] + [hit.text for _, hit in sources], deadline)
        except Exception as exc:
            if not is_dependency_failure(exc):
                raise
            sent.degrade("attribution", f"attribution: the embedder failed ({why(exc)}); by shared words")
            return _attribute_by_words(answer, sources)
        scores = vectors[1:] @ vectors[0]
        best = float(scores.max())
        if best < self.config.attribution_min_score:
            return []
        return [number for (number, _), s in sorted(zip(sources, scores), key=lambda x: -x[1])
                if s >= best - 0.05]

    async def close(self) -> None:
        await asyncio.gather(self.embedder.close(), self.generator.close(), *(s.close() for s in self.shards))


def relevance(hits: list[Hit]) -> float:
    """How closely the reranked `hits` (the sources an answer would come from) come to being about the
    question: the best one's relevance (its score without the bonus for holding a number or an option),
    or its score where the reranker gives no relevance."""
    return max(hit.score if hit.relevance is None else hit.relevance for hit in hits)


def _finish(answer: "_Answer", abstained: bool = False) -> AskDone:
    """The last event of an ask, counted."""
    done = answer.done(abstained)
    if abstained:
        ABSTENTIONS.inc()
    elif done.timings.time_to_first_token_ms:
        TIME_TO_FIRST_TOKEN.observe(done.timings.time_to_first_token_ms / 1000)
    return done


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) > 3}


def _attribute_by_words(answer: str, sources: list[tuple[int, Hit]], min_share: float = 0.5) -> list[int]:
    """The sources holding most of the answer's longer words (at least `min_share` of them), best first."""
    words = _words(answer)
    if not words:
        return []
    shares = sorted(((len(words & _words(hit.text)) / len(words), number) for number, hit in sources), reverse=True)
    best = shares[0][0]
    return [number for share, number in shares if share >= max(min_share, best - 0.1)]


class _Answer:
    """The answer as it is sent: its text so far, when the first of it went out, what it cites, and what
    was done in a simpler way because a dependency failed."""

    def __init__(self, clock: Clock, timings: Timings, degraded: list[str] | None = None):
        self.clock, self.timings = clock, timings
        self.parts: list[str] = []
        self.citations: list[int] = []
        self.support: list[Support] = []
        self.completion_tokens = 0
        self.extractive = False
        self.degraded = list(degraded or ())

    def degrade(self, stage: str, note: str) -> None:
        if note not in self.degraded:
            log.warning("%s", note)
            DEGRADED.labels(stage).inc()
            self.degraded.append(note)

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
                       self.extractive, self.degraded)


class _SentenceCheck:
    """Verifies the answer sentence by sentence; embeds (for the paraphrase test) only when words alone
    cannot decide."""

    def __init__(self, verifier: Verifier, embedder: EmbedderClient, deadline: Deadline, answer: "_Answer"):
        self.verifier, self.embedder, self.deadline, self.answer = verifier, embedder, deadline, answer
        self.kept: list[Verdict] = []
        self._evidence_vectors: np.ndarray | None = None
        self._by_words_only = False

    async def keep(self, sentence: str, timings: Timings) -> str | None:
        """The sentence as it should be sent (its citation attached), or None when it is dropped."""
        start = time.perf_counter()
        try:
            verdict = self.verifier.check(sentence)
            # Words decide alone only against: a sentence they accept, or might as a paraphrase, is also
            # compared by meaning with its evidence (one embedding of the sentence).
            if not self._by_words_only and (
                    verdict.supported or verdict.overlap >= self.verifier.config.min_paraphrase_overlap):
                try:
                    verdict = self.verifier.check(sentence, await self._similarity(verdict.sentence))
                except Exception as exc:
                    if not is_dependency_failure(exc):
                        raise
                    # The words' verdict stands (stricter: no paraphrase passes without its meaning).
                    self._by_words_only = True
                    self.answer.degrade("verification", f"verification: the embedder failed ({why(exc)}); by words only")
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
