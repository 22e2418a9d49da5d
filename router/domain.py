"""The router's domain types: what the flow takes, returns and streams. No gRPC, no protos: the
servicer converts the public API to these, the clients convert these to the services' APIs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from router.evidence import Span

MODES = ("dense", "lexical", "hybrid")

ABSTENTION = "The documents do not answer this question; the closest passages are listed as sources."


@dataclass(frozen=True)
class Scope:
    """Whose documents a request may see: one tenant, optionally only chunks with one of `tags`."""

    tenant: str = ""
    tags: tuple[str, ...] = ()


@dataclass
class Coverage:
    """Which shards answered a read; a result is partial when any failed."""

    answered: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    #: The retrieval that ran ("dense", "lexical", "hybrid"); "" before one has.
    retrieval: str = ""
    #: Stages done in a simpler way because a dependency failed.
    degraded: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.failed)

    def merge(self, other: "Coverage") -> "Coverage":
        """Shards that answered both retrievals; a shard that failed either counts as failed."""
        failed = sorted(set(self.failed) | set(other.failed))
        return Coverage(sorted((set(self.answered) | set(other.answered)) - set(failed)), failed,
                        self.retrieval, [*self.degraded, *other.degraded])


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk, from the shard that holds it; after reranking, with its best sentences."""

    score: float
    document_id: str
    chunk_id: str
    source: str
    text: str
    shard_id: int
    #: After reranking: the passage's sentences that best answer the question, best first.
    evidence: tuple[Span, ...] = ()
    #: After reranking: how closely the passage is about the question, whatever it holds (the reranker's
    #: score without its bonus for holding a number or an option); None where the reranker gives none.
    relevance: float | None = None


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
    generator_queue_ms: float = 0.0
    reread_ms: float = 0.0


# ---- ingest ----------------------------------------------------------------------------------


@dataclass
class DocumentInput:
    id: str
    source: str
    body: str | bytes
    format: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk as the router writes it to its shard."""

    chunk_id: str
    document_id: str
    text: str
    source: str
    vector: Sequence[float]
    tenant: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


@dataclass
class Ingested:
    id: str
    chunks: int
    shard_id: int
    replaced_chunks: int = 0


# ---- search and ask --------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchQuery:
    query: str
    top_k: int | None = None
    scope: Scope = Scope()
    require_complete: bool = False
    #: "" = the router's default retrieval mode.
    mode: str = ""
    #: None = the router's default.
    rerank: bool | None = None
    #: Per shard, the log sequence to read at least (tokens of earlier writes).
    min_sequences: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AskQuery:
    """A question and how to answer it; None and "" mean the router's defaults."""

    question: str
    top_k: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    scope: Scope = Scope()
    require_complete: bool = False
    use_cache: bool = True
    mode: str = ""
    #: Per shard, the log sequence to read at least (tokens of earlier writes).
    min_sequences: dict[int, int] = field(default_factory=dict)


@dataclass
class AskSources:
    """The first event of an ask: the numbered sources the answer may cite."""

    sources: list[tuple[int, Hit]]
    coverage: Coverage
    cached: bool = False


@dataclass
class AskToken:
    """A piece of the answer, in order."""

    text: str


@dataclass(frozen=True)
class Support:
    """The stretch of a cited source's text that supports the answer."""

    source: int
    span: Span
    text: str


@dataclass
class AskDone:
    """The last event of an ask."""

    citations: list[int]
    timings: Timings
    completion_tokens: int
    abstained: bool = False
    support: list[Support] = field(default_factory=list)
    extractive: bool = False
    #: Every stage done in a simpler way because a dependency failed (retrieval's included).
    degraded: list[str] = field(default_factory=list)


AskEvent = AskSources | AskToken | AskDone


@dataclass(frozen=True)
class Generated:
    """A piece of generated text; the generator's last reply also says how many tokens it produced."""

    text: str
    completion_tokens: int | None = None
    #: On the last reply: milliseconds the request waited for the generator to be free.
    queue_ms: float = 0.0


@dataclass(frozen=True)
class Likelihoods:
    """The generator's reading of one continuation after several contexts (its Score RPC)."""

    #: Per context, in order: the mean natural-log probability of the continuation's tokens.
    mean_logprob: list[float]
    #: Tokens of the continuation: mean × this is the continuation's whole log-likelihood.
    continuation_tokens: int
