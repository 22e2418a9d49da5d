"""From retrieved passages to evidence: combine the reranker's scores with the retrieval rank, pick the
sentences the model is shown, and build the short grounded prompt around them.

Why so little text in the prompt: measured on the labelled man-page set (bench/answers.py), the 135M
local model copies the answer out of two or three sentences far more often than out of four whole
passages, and the prompt is processed several times faster, which is most of the time to first token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A stretch of a passage's text by character offsets, with the reranker's score for it."""

    start: int
    end: int
    score: float = 0.0


@dataclass(frozen=True)
class Scored:
    """The reranker's verdict on one candidate: its position in the candidate list, score, best sentences."""

    index: int
    score: float
    spans: tuple[Span, ...] = ()
    #: How closely the candidate is about the question, whatever it holds; None where the reranker says not.
    relevance: float | None = None


@dataclass(frozen=True)
class Sentence:
    """A piece of evidence: a sentence of source `number`."""

    number: int
    span: Span
    text: str


@dataclass
class EvidenceConfig:
    # Weight of the retrieval prior 1/(1 + fused rank) added to the reranker's score (fitted, see README).
    prior_weight: float = 0.0
    # Most sentences given to the model, and the token budget they must fit.
    sentences: int = 3
    tokens: int = 160
    # Sentences are taken from at most this many of the best sources.
    sources: int = 2
    # Sentences scoring this far below the best one are left out.
    max_gap: float = 0.25


def combine(scored: Sequence[Scored], prior_weight: float) -> list[Scored]:
    """Candidates best first by reranker score + prior_weight / (1 + retrieval rank)."""
    combined = [Scored(s.index, s.score + prior_weight / (1 + s.index), s.spans, s.relevance) for s in scored]
    return sorted(combined, key=lambda s: (-s.score, s.index))


def select(sources: Sequence[tuple[int, str, Sequence[Span]]], config: EvidenceConfig,
           count_tokens: Callable[[str], int]) -> list[Sentence]:
    """The best sentences of the best sources (`(number, text, spans)`, best source first), within the
    budget, in reading order per source (a sentence read out of order can change its meaning)."""
    pool = [Sentence(number, span, text[span.start : span.end])
            for number, text, spans in sources[: config.sources] for span in spans]
    if not pool:
        return []
    best = max(s.span.score for s in pool)
    pool.sort(key=lambda s: -s.span.score)
    chosen, used = [], 0
    for sentence in pool:
        if len(chosen) == config.sentences:
            break
        if chosen and sentence.span.score < best - config.max_gap:
            break
        cost = count_tokens(sentence.text)
        if chosen and used + cost > config.tokens:
            continue
        chosen.append(sentence)
        used += cost
    order = {number: i for i, (number, _, _) in enumerate(sources)}
    return sorted(chosen, key=lambda s: (order[s.number], s.span.start))


SYSTEM_PROMPT = (
    "You answer a question from the evidence given. Use only facts stated in the evidence. "
    "Answer in one short sentence. If the evidence does not answer the question, reply: I don't know."
)
# One paragraph: past its first line break the small model starts code blocks and lists.
STOP_SEQUENCES = ["\n"]


def grounded_messages(question: str, evidence: Sequence[Sentence]) -> list[dict[str, str]]:
    """The chat prompt: a fixed system turn (llama.cpp keeps its state cached), then evidence and question."""
    lines = "\n".join(f"[{s.number}] {s.text}" for s in evidence)
    user = f"Evidence:\n{lines}\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def quoted(evidence: Sequence[Sentence], limit: int = 2) -> list[Sentence]:
    """What the extractive answer quotes: the best (at most `limit`) evidence sentences of the best source, in
    reading order. The best source, not the best lone sentence: a passage's score weighs what the whole
    passage is about, which a single sentence's similarity often misjudges."""
    if not evidence:
        return []
    first = min(s.number for s in evidence)
    same = sorted((s for s in evidence if s.number == first), key=lambda s: -s.span.score)[:limit]
    return sorted(same, key=lambda s: s.span.start)


def quote(evidence: Sequence[Sentence], limit: int = 2) -> str:
    """The extractive answer: `quoted(evidence)`, each sentence in quotes with its citation."""
    return " ".join(f"“{_tidy(s.text)}” [{s.number}]" for s in quoted(evidence, limit))


def _tidy(text: str) -> str:
    return " ".join(text.split())
