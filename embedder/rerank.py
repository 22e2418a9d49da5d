"""Reranking with the embedding model: how well each text answers a query, and which sentences do.

Small-to-big: a passage is as good as its best sentence. Each text is cut into sentences
(`fabric.text.sentence_spans`); every sentence is scored by

    score = dense_weight · cos(query, sentence) + lexical_weight · BM25(query, sentence) / BM25(query, ideal)
            + type_weight · [the sentence holds what the question asks for: a number, an option, a signal]

where the BM25 statistics (IDF, mean length) come from all the sentences of the request, and the
"ideal" sentence holds each query term once at mean length, so the lexical part is ~0..1 like the
cosine. A text's score is its best sentence's, plus `context_weight` · cos(query, whole text) so that a
passage about the subject beats a stray sentence that happens to match. The weights were fitted on the
labelled man-page set (bench/answers.py --fit); see the README.

A text's relevance is its score without the answer-type bonus: holding a number makes a sentence the
likelier answer to "how many" among sentences about the question, but is no sign that it is about the
question at all ("how long should an egg be boiled?" against a man page's "the zero number of seconds
…"), so the router's abstention reads the relevance.

This is the scorer behind the `Rerank` RPC: a cross-encoder can replace it without the router knowing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import re

import numpy as np

from fabric.text import answer_types, content_words, has_answer_type, sentence_spans

# Fitted on bench/data/answers (see bench/answers.py --fit): evidence-sentence hit@1 on held-out pages.
DENSE_WEIGHT = 1.0
LEXICAL_WEIGHT = 0.35
CONTEXT_WEIGHT = 0.1
TYPE_WEIGHT = 0.3
# Verbs a question is phrased with that say nothing about which sentence answers it ("how do bees tell ...").
_GENERIC = frozenset(content_words("tell let know make give take show find get keep need come go put see say "
                                   "happen want try call"))
_WORDS = re.compile(r"[A-Za-z0-9]+")
_ANSWER_ATOM = re.compile(r"(?<![\w-])--?[A-Za-z]|\d")
BM25_K1 = 1.2
BM25_B = 0.75


@dataclass(frozen=True)
class Span:
    """A sentence of a text, by character offsets (Unicode code points), and how well it answers."""

    start: int
    end: int
    score: float


@dataclass(frozen=True)
class Ranked:
    """One input text: its position in the request, its score, its best sentences (best first)."""

    index: int
    score: float
    spans: list[Span]
    #: The score without the answer-type bonus: how closely the text is about the query, whatever it holds
    #: (None from a scorer without such a bonus: its score says it).
    relevance: float | None = None


@dataclass(frozen=True)
class Weights:
    dense: float = DENSE_WEIGHT
    lexical: float = LEXICAL_WEIGHT
    context: float = CONTEXT_WEIGHT
    answer_type: float = TYPE_WEIGHT


Embed = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass(frozen=True)
class Features:
    """Per-sentence features of one request, kept apart so the weights can be fitted offline."""

    sentences: list[tuple[int, int, int]]  # (text index, start, end)
    dense: np.ndarray  # cos(query, sentence)
    lexical: np.ndarray  # BM25 / ideal BM25
    context: np.ndarray  # cos(query, text), per text
    typed: np.ndarray  # 1 where the sentence holds the kind of thing the question asks for


async def features(query: str, texts: Sequence[str], embed: Embed, titles: Sequence[str] = ()) -> Features:
    """`titles[i]`, when given, is what text i is about (its document's title): a sentence is read with its
    title in front, so "it makes three passes" is known to be about shred.

    Only the sentences are embedded (one model call for the whole request); a pair's vector is the
    length-weighted mean of its two sentences' and a text's the mean of all its sentences' (mean-pooled
    embeddings add up nearly so), which costs a third of embedding pairs and texts whole."""
    titled = [f"{titles[i]}: " if i < len(titles) and titles[i] else "" for i in range(len(texts))]
    per_text = [sentence_spans(text) or [(0, len(text))] for text in texts]
    flat = [(i, a, b) for i, spans in enumerate(per_text) for a, b in spans]
    vectors = await embed([query, *(titled[i] + texts[i][a:b] for i, a, b in flat)])
    q, sentence_vectors = vectors[0], vectors[1:]
    weights = np.array([b - a for _, a, b in flat], dtype=np.float32)[:, None]

    units, unit_vectors, context, row = [], [], np.zeros(len(texts), dtype=np.float32), 0
    for i, spans in enumerate(per_text):
        rows = range(row, row + len(spans))
        row += len(spans)
        context[i] = _normalise((sentence_vectors[rows] * weights[rows]).sum(axis=0)) @ q
        for (start, end), r in _units(texts[i], spans, rows):
            units.append((i, start, end))
            unit_vectors.append(_normalise((sentence_vectors[r] * weights[r]).sum(axis=0)))
    pieces = [titled[i] + texts[i][a:b] for i, a, b in units]
    kinds = answer_types(query)
    typed = np.array([float(bool(kinds) and has_answer_type(p, kinds)) for p in pieces], dtype=np.float32)
    dense = np.array(unit_vectors, dtype=np.float32).reshape(len(units), -1) @ q
    return Features(units, dense, _bm25(query, pieces), context, typed)


def _normalise(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm else v


def rank(features: Features, n_texts: int, weights: Weights = Weights(), spans_per_text: int = 3) -> list[Ranked]:
    """Texts best first, each with its `spans_per_text` best sentences."""
    relevance = weights.dense * features.dense + weights.lexical * features.lexical
    sentence_scores = relevance + weights.answer_type * features.typed
    per_text: list[list[Span]] = [[] for _ in range(n_texts)]
    best_relevance = [-math.inf] * n_texts
    for (i, start, end), score, about in zip(features.sentences, sentence_scores.tolist(), relevance.tolist()):
        per_text[i].append(Span(start, end, score))
        best_relevance[i] = max(best_relevance[i], about)
    ranked = []
    for i, spans in enumerate(per_text):
        spans.sort(key=lambda s: -s.score)
        best = spans[0].score if spans else 0.0
        context = weights.context * float(features.context[i])
        about = best_relevance[i] if spans else 0.0
        ranked.append(Ranked(i, best + context, _disjoint(spans, spans_per_text), about + context))
    ranked.sort(key=lambda r: (-r.score, r.index))
    return ranked


def _disjoint(spans: list[Span], n: int) -> list[Span]:
    """The best `n` spans that do not overlap one another (spans sorted best first)."""
    chosen: list[Span] = []
    for span in spans:
        if len(chosen) == n:
            break
        if all(span.end <= c.start or span.start >= c.end for c in chosen):
            chosen.append(span)
    return chosen


async def rerank(query: str, texts: Sequence[str], embed: Embed, weights: Weights = Weights(),
                 spans_per_text: int = 3, titles: Sequence[str] = ()) -> list[Ranked]:
    return rank(await features(query, texts, embed, titles), len(texts), weights, spans_per_text)


def _units(text: str, spans: list[tuple[int, int]], rows: Sequence[int]):
    """((start, end), the sentence rows it spans) for each sentence that can answer on its own, and each pair of
    neighbouring sentences of one paragraph (or a heading and the paragraph after it): an option's name and
    the sentence that describes it, a claim and the number that follows it, are often one answer. The
    cut-off sentence a chunk may begin with (its overlap with the chunk before) is left out."""
    whole = [k for k, (a, b) in enumerate(spans) if not (a == 0 and text[:1].islower())]
    out = [((spans[k][0], spans[k][1]), [rows[k]]) for k in whole if _can_answer(text[spans[k][0] : spans[k][1]])]
    for k, m in zip(whole, whole[1:]):
        a, b = spans[k], spans[m]
        if m == k + 1 and ("\n\n" not in text[a[1] : b[0]] or _heading(text[a[0] : a[1]])):
            out.append(((a[0], b[1]), [rows[k], rows[m]]))
    if not out:  # a text of one heading, say: it is still ranked
        out = [((spans[0][0], spans[-1][1]), list(rows))]
    return out


def _can_answer(piece: str) -> bool:
    """A heading ('The waggle dance') or a stray '.' answers nothing on its own; an option's name or a
    number does."""
    if _ANSWER_ATOM.search(piece):
        return True
    return len(_WORDS.findall(piece)) >= 3 and not _heading(piece)


def _heading(piece: str) -> bool:
    """A short paragraph that names what the next one says: an option ('-i[SUFFIX], --in-place'), a title."""
    return len(piece) <= 60 and piece[-1:] not in ".!?:;"


def _bm25(query: str, sentences: list[str]) -> np.ndarray:
    terms = set(content_words(query)) - _GENERIC
    docs = [Counter(content_words(s)) for s in sentences]
    if not terms or not docs:
        return np.zeros(len(sentences), dtype=np.float32)
    n = len(docs)
    mean_length = max(1.0, sum(sum(d.values()) for d in docs) / n)
    idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t in terms for df in [sum(1 for d in docs if t in d)]}
    ideal = sum(idf.values()) * (BM25_K1 + 1) / (1 + BM25_K1)  # each term once, at mean length
    scores = np.zeros(n, dtype=np.float32)
    for j, doc in enumerate(docs):
        norm = BM25_K1 * (1 - BM25_B + BM25_B * sum(doc.values()) / mean_length)
        scores[j] = sum(idf[t] * doc[t] * (BM25_K1 + 1) / (doc[t] + norm) for t in terms if t in doc)
    return np.minimum(scores / ideal, 1.0)  # a term said twice does not make the sentence answer twice as well
