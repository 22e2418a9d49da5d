"""Re-reading the evidence: which of the best sentences was the question written about?

The reranker scores a sentence by embedding similarity and shared words, which cannot tell "The cells hold
developing brood and stores of pollen and honey" (0.647) from the waggle-dance sentence (0.651) as the
answer to "How do honeybees tell each other where the flowers are?". A language model can: the question
is far likelier written after the waggle-dance sentence than after the one about cells. So the generator's
model reads each of the best sentences (across the candidates) as a passage and scores the question after
it: log P(question | "Passage: <title>: <sentence> … Question:"), per question token (unsupervised passage
re-ranking, Sachan et al. 2022, here on sentences). Each read sentence's score moves by `weight` × how far
its log-likelihood falls short of the best one's; so the best-read sentence keeps its score, the others
drop, and a candidate is re-ordered by its best sentence as before.

Measured offline on both labelled sets (the README's run I): the sentence the answer is built from holds
the answer more often on both. A generator that cannot score (UNIMPLEMENTED) leaves the order as it is.

The same reading says when the evidence does not answer at all. A question about an option a command does
not have ("Which shred option encrypts the file with AES?") finds sentences about the command, and the
reranker cannot tell them from answers; but none of them makes that question much likelier than the
command's name alone does. So the `lift` of the sentence the answer would be built from is the question's
log-likelihood after it less that after its title read alone (what the topic explains), in nats over the
whole question: a pointwise mutual information of question and sentence, given the document. Below
`abstain_below` the ask abstains (the README's run J). Off by default: a short question about the document's
own subject ("What is photosynthesis?") is as likely after the title alone as after the sentence that answers
it, so its lift is small too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from router.domain import Hit
from router.evidence import Span
from router.parsing import title_for

#: The reading: a sentence as a passage, then the question the model is asked to have written about it.
PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion: "


@dataclass(frozen=True)
class RereadConfig:
    #: Sentences read, the best by the reranker's score across the candidates; 0 turns re-reading off.
    sentences: int = 4
    #: Score moved per unit of mean log-likelihood (nats per question token) below the best-read sentence.
    weight: float = 0.5
    #: Longest the reading may take; past it the reranker's order stands.
    timeout_s: float = 3.0
    #: Abstain when the chosen sentence's `lift` (nats over the question) is below this; None (the default): never.
    abstain_below: float | None = None


def pool(hits: Sequence[Hit], n: int) -> list[tuple[int, Span]]:
    """The `n` best evidence spans across `hits`, as (hit position, span), best first."""
    spans = [(i, span) for i, hit in enumerate(hits) for span in hit.evidence]
    spans.sort(key=lambda item: -item[1].score)
    return spans[:n]


def prompts(hits: Sequence[Hit], read: Sequence[tuple[int, Span]]) -> list[str]:
    """What the model reads before the question, one per pooled span: the sentence with its title."""
    out = []
    for i, span in read:
        hit, text = hits[i], hits[i].text[span.start : span.end]
        title = title_for(hit.source)
        out.append(PROMPT.format(passage=f"{title}: {text}" if title else text))
    return out


def baselines(hits: Sequence[Hit], read: Sequence[tuple[int, Span]]) -> list[str]:
    """What the model reads when the sentence is left out: each title among the read spans' alone, in order of
    first appearance (one prompt for an untitled source)."""
    return [PROMPT.format(passage=title) for title in _titles(hits, read)]


def _titles(hits: Sequence[Hit], read: Sequence[tuple[int, Span]]) -> list[str]:
    return list(dict.fromkeys(title_for(hits[i].source) for i, _ in read))


def lift(hits: Sequence[Hit], read: Sequence[tuple[int, Span]], logprobs: Sequence[float],
         baseline_logprobs: Sequence[float], tokens: int, chosen: Hit) -> float | None:
    """How much the sentence the answer is built from (`chosen`'s best span, once rescored) raises the
    question's log-likelihood over its title read alone, in nats over the question's `tokens`. None when that
    span was not read (nothing to judge it by)."""
    if not read or not chosen.evidence:
        return None
    top = chosen.evidence[0]
    mine = [lp for (i, span), lp in zip(read, logprobs)
            if hits[i].chunk_id == chosen.chunk_id and (span.start, span.end) == (top.start, top.end)]
    if not mine:
        return None
    own_title = title_for(chosen.source)
    titled = dict(zip(_titles(hits, read), baseline_logprobs))
    if own_title not in titled:
        return None
    return tokens * (mine[0] - titled[own_title])


def rescore(hits: Sequence[Hit], read: Sequence[tuple[int, Span]], logprobs: Sequence[float],
            weight: float) -> list[Hit]:
    """`hits` re-ordered by their best sentence's new score. A read sentence's score drops by `weight` ×
    (best log-likelihood − its own); a sentence not read ranked below every read one, so it drops as
    far as the worst-read (a candidate without evidence too)."""
    if not read:
        return list(hits)
    best, worst = max(logprobs), min(logprobs)
    moved = {(i, span.start, span.end): weight * (lp - best) for (i, span), lp in zip(read, logprobs)}
    floor = weight * (worst - best)
    out = []
    for i, hit in enumerate(hits):
        if not hit.evidence:
            out.append(replace(hit, score=hit.score + floor))
            continue
        spans = sorted((Span(s.start, s.end, s.score + moved.get((i, s.start, s.end), floor)) for s in hit.evidence),
                       key=lambda s: -s.score)
        before = max(s.score for s in hit.evidence)
        out.append(replace(hit, score=hit.score - before + spans[0].score, evidence=tuple(spans)))
    out.sort(key=lambda h: -h.score)  # stable: ties keep the reranker's order
    return out
