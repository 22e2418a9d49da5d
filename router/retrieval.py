"""Retrieval: a query's best chunks from every shard (dense, lexical or both fused), then optionally
reranked by how well each answers it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from fabric.client import Deadline
from fabric.errors import InvalidArgument, Unavailable, code_of, is_dependency_failure, leaves_out
from fabric.telemetry import span, tracer
from router.clients import EmbedderClient
from router.clock import Clock
from router.config import RagConfig
from router.domain import MODES, Coverage, Hit, Scope
from router.evidence import combine
from router.metrics import DEGRADED, DOWNSTREAM_CALLS, PARTIAL_RESULTS, STAGE_SECONDS, STALE_READS
from router.parsing import title_for
from router.topology import ShardGroup

log = logging.getLogger(__name__)

_tracer = tracer("ragloom.router")

RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion


def fuse_reciprocal_rank(rankings: list[list[Hit]], k: int = 0, reserved: int = 0) -> list[Hit]:
    """Reciprocal rank fusion: each list adds 1 / (RRF_K + rank) to a chunk's score; best first.

    With `reserved`, the first `k` hold each list's best `reserved` whatever their fused rank, the rest of
    them in fused order. Fusion rewards being in both lists, so a chunk one method ranks near the top and
    the other never lists (a paraphrase sharing no word with the text BM25 reads) can fall below chunks
    both list far down; a reranker's candidates should not lose it."""
    fused: dict[str, Hit] = {}
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            fused.setdefault(hit.chunk_id, hit)
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    order = sorted(scores, key=lambda chunk_id: -scores[chunk_id])
    if reserved and len(order) > k:
        kept = {hit.chunk_id for ranking in rankings for hit in ranking[:reserved]}
        first, others = [], k - len(kept)  # the seats left for the best of the rest
        for chunk_id in order:
            if chunk_id in kept or others > 0:
                first.append(chunk_id)
                others -= chunk_id not in kept
        first = first[:k]
        chosen = set(first)
        order = first + [c for c in order if c not in chosen]
    return [replace(fused[c], score=scores[c]) for c in order]


class QueryVectors(Protocol):
    """Where a query's embedding comes from (the embedder, or a cache in front of it)."""

    async def query(self, text: str, deadline: Deadline, tenant: str = "", looked_up: bool = False) -> np.ndarray:
        """The (1, dim) embedding of one query, asked for `tenant` (a cache keeps tenants apart); `looked_up`:
        `cached` has just said it is not at hand (a cache need not look again)."""

    async def cached(self, text: str, tenant: str = "") -> np.ndarray | None:
        """That embedding if it is at hand without the embedder, else None."""


class Uncached:
    def __init__(self, embedder: EmbedderClient):
        self.embedder = embedder

    async def cached(self, text: str, tenant: str = "") -> np.ndarray | None:
        return None

    async def query(self, text: str, deadline: Deadline, tenant: str = "", looked_up: bool = False) -> np.ndarray:
        DOWNSTREAM_CALLS.labels("embedder").inc()
        return await self.embedder.embed([text], deadline)


@dataclass(frozen=True)
class Floors:
    """Per shard, the log sequence a read must see: `strict` (the caller's tokens: a shard short of it is
    left out) and `soft` (what this router itself wrote: waited for, then relaxed rather than missed)."""

    strict: dict[int, int] = field(default_factory=dict)
    soft: dict[int, int] = field(default_factory=dict)

    def merged(self) -> dict[int, int]:
        return {s: max(self.strict.get(s, 0), self.soft.get(s, 0)) for s in {*self.strict, *self.soft}}

    def softens(self, shard: int, wanted: dict[int, int]) -> bool:
        """Whether dropping the soft floor would ask less of `shard` than `wanted` did."""
        return wanted.get(shard, 0) > self.strict.get(shard, 0)


@dataclass
class Retrieved:
    hits: list[Hit]
    coverage: Coverage
    embed_ms: float = 0.0
    index_ms: float = 0.0


class Retriever:
    def __init__(self, config: RagConfig, embedder: EmbedderClient, shards: list[ShardGroup],
                 vectors: QueryVectors | None = None):
        self.config = config
        self.embedder = embedder
        self.shards = shards
        self.vectors = vectors or Uncached(embedder)

    async def retrieve(self, query: str, k: int, scope: Scope, require_complete: bool, deadline: Deadline,
                       mode: str = "", floors: Floors | None = None, reserved: int = 0) -> Retrieved:
        """Top-k chunks for `query`: dense (embedding), lexical (BM25) or hybrid (both, fused by reciprocal
        rank; with `reserved`, each method's best that many among the k), from replicas that have applied
        their shard's log through the `floors`."""
        floors = floors or Floors()
        mode = mode or self.config.retrieval_mode
        if mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        clock, embed_ms = Clock(), 0.0
        # Hybrid fuses two longer lists: a chunk ranked just below k by one method can win on the other.
        depth = k if mode != "hybrid" else min(max(2 * k, 20), self.config.max_top_k)
        ef = max(self.config.ef, depth)
        looked_up = mode == "hybrid"
        if looked_up and (vector := await self.vectors.cached(query, scope.tenant)) is not None:
            # The embedding at hand: both halves in one call per shard.
            embed_ms = clock.lap()
            (dense, lexical_hits), coverage = await self._fan_out(
                "hybrid", lambda f: lambda c: c.hybrid_search(vector[0], query, depth, ef, scope, deadline,
                                                               f.get(c.shard_id)),
                floors, require_complete, deadline, parts=2)
            return self._retrieved(fuse_reciprocal_rank([dense, lexical_hits], k, reserved), coverage, mode, [], k,
                                   embed_ms, clock)
        lexical = (asyncio.ensure_future(self._fan_out(
            "lexical", lambda f: lambda c: c.lexical_search(query, depth, scope, deadline, f.get(c.shard_id)),
            floors, require_complete, deadline))
            if mode != "dense" else None)
        degraded = []
        try:
            dense = None
            if mode != "lexical":
                try:
                    with span(_tracer, "embed query"):
                        vector = await self.vectors.query(query, deadline, scope.tenant, looked_up=looked_up)
                except Exception as exc:
                    if mode != "hybrid" or not is_dependency_failure(exc):
                        raise
                    # Hybrid without the embedder is BM25 alone: an answer from words beats none.
                    log.warning("embedder failed (%s): %r answered by lexical retrieval only", exc, query[:80])
                    degraded.append(f"retrieval: the embedder failed ({why(exc)}); lexical (BM25) only")
                    DEGRADED.labels("retrieval").inc()
                    mode = "lexical"
                embed_ms = clock.lap()
                if mode != "lexical":
                    dense = await self._fan_out(
                        "dense", lambda f: lambda c: c.search(vector[0], depth, ef, scope, deadline, f.get(c.shard_id)),
                        floors, require_complete, deadline)
            lexical_result = await lexical if lexical is not None else None
        except BaseException:
            if lexical is not None:
                lexical.cancel()
            raise
        if mode == "hybrid":
            hits = fuse_reciprocal_rank([dense[0], lexical_result[0]], k, reserved)
            coverage = dense[1].merge(lexical_result[1])
        else:
            hits, coverage = dense if mode == "dense" else lexical_result
        return self._retrieved(hits, coverage, mode, degraded, k, embed_ms, clock)

    @staticmethod
    def _retrieved(hits: list[Hit], coverage: Coverage, mode: str, degraded: list[str], k: int, embed_ms: float,
                   clock: Clock) -> Retrieved:
        coverage.retrieval, coverage.degraded = mode, [*coverage.degraded, *degraded]
        index_ms = clock.lap()
        STAGE_SECONDS.labels("embedding").observe(embed_ms / 1000)
        STAGE_SECONDS.labels("retrieval").observe(index_ms / 1000)
        return Retrieved(hits[:k], coverage, embed_ms, index_ms)

    async def _fan_out(self, kind: str, call, floors: Floors, require_complete: bool,
                       deadline: Deadline, parts: int = 1):
        """`call(floors)` on every shard (one replica each, failing over), merged best first, with who answered.
        With `parts` > 1 each shard answers that many lists (hybrid: dense and BM25), each merged on its own."""
        DOWNSTREAM_CALLS.labels("indexer").inc()
        wanted = floors.merged()

        async def one(group: ShardGroup) -> list[Hit]:
            with span(_tracer, "search shard", **{"ragloom.shard": group.shard_id, "ragloom.retrieval": kind}):
                try:
                    return await group.read(call(wanted), deadline)
                except Exception as exc:
                    if not floors.softens(group.shard_id, wanted) or not leaves_out(exc):
                        raise
                # No replica got to this router's own last write in time (a log failing over, say): a
                # moment stale beats missing. A caller's own tokens are never relaxed.
                STALE_READS.labels(str(group.shard_id)).inc()
                return await group.read(call(floors.strict), deadline)

        replies = await asyncio.gather(*(one(g) for g in self.shards), return_exceptions=True)
        coverage, merged = Coverage(), [[] for _ in range(parts)]
        for group, reply in zip(self.shards, replies):
            if isinstance(reply, BaseException):
                if not leaves_out(reply):
                    raise reply
                coverage.failed.append(group.shard_id)
                PARTIAL_RESULTS.labels(str(group.shard_id)).inc()
                continue
            coverage.answered.append(group.shard_id)
            for hits, part in zip(merged, reply if parts > 1 else (reply,)):
                hits.extend(part)
        if coverage.failed and (require_complete or not coverage.answered):
            raise Unavailable(f"shards {coverage.failed} did not answer in time; "
                              f"{len(coverage.answered)} of {len(self.shards)} did")
        for hits in merged:
            hits.sort(key=lambda h: h.score, reverse=True)
        return (tuple(merged) if parts > 1 else merged[0]), coverage

    async def rerank(self, query: str, hits: list[Hit], deadline: Deadline) -> tuple[list[Hit], float]:
        """Candidates best first by how well they answer `query` (the embedder's Rerank), each with its best
        sentences, and the milliseconds it took; the retrieval rank adds a small prior. Scores become the
        combined rerank score. Raises what the embedder raised (the caller decides whether to go on)."""
        clock = Clock()
        with span(_tracer, "rerank", **{"ragloom.candidates": len(hits)}):
            DOWNSTREAM_CALLS.labels("embedder").inc()
            scored = await self.embedder.rerank(query, [h.text for h in hits], deadline,
                                                titles=[title_for(h.source) for h in hits])
        ranked = combine(scored, self.config.evidence.prior_weight)
        elapsed = clock.lap()
        STAGE_SECONDS.labels("rerank").observe(elapsed / 1000)
        return [replace(hits[r.index], score=r.score, evidence=r.spans, relevance=r.relevance) for r in ranked], elapsed


def why(exc: BaseException) -> str:
    """A failure in a word or two, for a `degraded` note: its status code, else its type."""
    code = code_of(exc)
    return code.name if code is not None else type(exc).__name__
