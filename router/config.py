"""How the router's flow behaves: limits, defaults and the answer pipeline's switches."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.evidence import EvidenceConfig
from router.reread import RereadConfig
from router.verify import VerifierConfig


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
    # Work budgets, refused before any model work: a question's or query's length in tokens, and the
    # chunks one ingest request may make.
    max_question_tokens: int = 512
    max_chunks_per_request: int = 20_000
    retrieval_mode: str = "hybrid"
    # Citation fallback: when the model writes no [n] markers, sources this close to the answer are cited.
    attribution_min_score: float = 0.45
    # Reranking: candidates retrieved and reranked for Ask (and for Search with rerank), and whether Ask and
    # Search rerank when the request does not say.
    rerank_candidates: int = 12
    # Of those candidates (hybrid), each retrieval method's best this many, whatever their fused rank.
    rerank_reserved: int = 3
    rerank_ask: bool = True
    rerank_search: bool = False
    # "evidence": the best sentences, numbered (the default); "passages": whole passages as before reranking.
    prompt: str = "evidence"
    # Check every answer sentence against the evidence, dropping what is unsupported.
    verify: bool = True
    # Abstain when no source's relevance (reranked) reaches this (fitted on the labelled sets); None: never.
    abstain_below: float | None = 0.44
    # When no generated sentence is supported, the evidence is quoted if the best passage scores at least
    # this; below it the ask abstains (weak evidence and an answer that cannot be verified).
    quote_min_score: float = 0.0
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    # The generator's model re-reads the best evidence sentences before the answer is built from them.
    reread: RereadConfig = field(default_factory=RereadConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)

    def pipeline_key(self) -> str:
        """What decides an answer beside the question: part of the answer cache's key."""
        return (f"{self.rerank_ask}:{self.rerank_candidates}:{self.rerank_reserved}:{self.prompt}:{self.verify}:"
                f"{self.abstain_below}:{self.quote_min_score}:{self.evidence}:{self.verifier}:"
                f"{self.reread.sentences}:{self.reread.weight}:{self.reread.abstain_below}")
