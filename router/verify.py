"""Checks each sentence of a generated answer against the evidence it was generated from.

A sentence is kept only when
  * every number and every command-line option name in it appears in the best evidence sentence (of
    the reranker's best source): a small model's favourite inventions are numbers ("a SHA-1 hash 203856749",
    "watch accepts 1 second") and, given three sentences, the option of the wrong one;
  * it says something the question did not: two content words of the evidence that are not in the
    question and not mere filler ("you can use the following command:"), or a number or option;
  * it is prose, not code, and does not decline ("not specified", "I don't know");
  * its meaning is close to that one evidence sentence (embedding cosine ≥ `min_support_similarity`) and
    most of its content words come from it or the question (`min_overlap`), or, for a
    paraphrase, enough of them do (`min_paraphrase_overlap`) and its meaning is close to an evidence
    sentence (embedding cosine ≥ `min_similarity`).
The sentence is then cited to the source whose evidence supports it best — the citation is attached
by the router, never taken from the model's [n] markers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fabric.text import content_words, numbers, options
from router.evidence import Sentence

_MARKER = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")
_DECLINES = re.compile(r"\b(?:i (?:do not|don't|cannot|can't) (?:know|tell|say|answer)|(?:is|are) not (?:stated|mentioned|"
                       r"provided|given|specified|possible|known)|does not (?:say|mention|state|answer|specify)|"
                       r"no information)\b", re.I)
# Code, not an answer: a definition, a call, a shell prompt, a fenced block.
_CODE = re.compile(r"^\s*(?:def |class |import |\$ |>>> |```)|[{};]\s*$|\w\(\S*\)|`{3}")
# Words that carry no answer of their own.
FILLER = frozenset(content_words(
    "answer question evidence command commands option options flag flags file files following example "
    "specify specified specifies used run runs running way order whether information text line lines output"))
# A sentence ends at . ! ? (not inside a number or an option like "-n."), or at a line break.
_BOUNDARY = re.compile(r"(?<=[^\d\s][.!?])\s+|(?<=\d[.!?])\s+(?=[A-Z])|\n+")


@dataclass
class VerifierConfig:
    min_overlap: float = 0.6
    min_paraphrase_overlap: float = 0.34
    min_similarity: float = 0.8
    # Even a sentence made of the evidence's words must mean something close to it: "the colony tells where the
    # flowers are by laying a few hundred bees on branches" is all evidence words and no evidence claim.
    min_support_similarity: float = 0.7
    # A paraphrase may bring at most this many content words of its own (negative: any number).
    max_paraphrase_new_words: int = 2
    # So may a sentence kept because most of its words are the evidence's: "painted in 1931 by the local artist"
    # is 5 of 7 words from "was painted teal in 1931" and a painter of its own (negative: any number).
    max_new_words: int = 1


@dataclass(frozen=True)
class Verdict:
    sentence: str  # the sentence without the model's own [n] markers
    supported: bool
    reason: str
    source: int = 0  # number of the supporting source when supported
    support: Sentence | None = None  # the evidence sentence that supports it best
    overlap: float = 0.0


# What a small model puts before its answer: "The answer is: …", "Based on the evidence, …".
_PREAMBLE = re.compile(r"^\s*(?:(?:the |my )?answer(?: is)?|based on (?:the )?(?:evidence|passages?|sources?|text)|"
                       r"according to (?:the )?(?:evidence|passages?|sources?|text))\s*[:,]\s*", re.I)


def strip_markers(text: str) -> str:
    """The sentence without the model's [n] markers and without a preamble before what it says."""
    text = _MARKER.sub("", text).strip()
    if (rest := _PREAMBLE.sub("", text, count=1)) != text and rest:
        text = rest[0].upper() + rest[1:]
    return text


def declines(text: str) -> bool:
    """The model said the evidence does not answer."""
    return bool(_DECLINES.search(text))


def split_sentences(buffer: str) -> tuple[list[str], str]:
    """Complete sentences at the front of a growing answer, and the unfinished rest."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(buffer):
        piece = buffer[start : match.start()].strip()
        if piece:
            sentences.append(piece)
        start = match.end()
    return sentences, buffer[start:]


class Verifier:
    def __init__(self, question: str, evidence: Sequence[Sentence], config: VerifierConfig = VerifierConfig()):
        self.config = config
        self.evidence = list(evidence)
        # The best sentence of the best source: what the question is about (and what a quote would say).
        first = min((s.number for s in self.evidence), default=0)
        primary = max((s for s in self.evidence if s.number == first), key=lambda s: s.span.score).text \
            if self.evidence else ""
        self._primary_numbers, self._primary_options = numbers(primary), options(primary)
        self._question = set(content_words(question))
        self._question_options = options(question)
        self._words = [set(content_words(e.text)) for e in self.evidence]
        self._numbers = [numbers(e.text) for e in self.evidence]
        self._options = [options(e.text) for e in self.evidence]

    def check(self, sentence: str, similarity: Sequence[float] | None = None) -> Verdict:
        """Whether `sentence` is supported; `similarity[i]` is its embedding cosine to evidence sentence i."""
        clean = strip_markers(sentence)
        words = content_words(clean)
        if not words:
            return Verdict(clean, False, "no content")
        if declines(clean):
            return Verdict(clean, False, "declines to answer")
        if _CODE.search(clean):
            return Verdict(clean, False, "code, not an answer")
        best: Verdict | None = None
        for i in range(len(self.evidence)):
            verdict = self._against(clean, words, i, similarity)
            if verdict.supported:
                if best is None or not best.supported or verdict.overlap > best.overlap:
                    best = verdict
            elif best is None or (not best.supported and verdict.overlap > best.overlap):
                best = verdict
        return best or Verdict(clean, False, "no evidence")

    def _against(self, clean: str, words: list[str], i: int, similarity: Sequence[float] | None) -> Verdict:
        """Is `clean` supported by evidence sentence i alone? (A claim stitched from words of several
        sentences — "a round dance, also known as a bee-hive" — is how a small model invents.)"""
        evidence = self.evidence[i]
        evidence_words = self._words[i]
        said_numbers, said_options = numbers(clean), options(clean)
        missing_numbers = said_numbers - (self._numbers[i] & self._primary_numbers)
        if missing_numbers:
            return Verdict(clean, False, f"number {sorted(missing_numbers)[0]} is not in the best evidence")
        missing_options = said_options - (self._options[i] & self._primary_options) - self._question_options
        if missing_options:
            return Verdict(clean, False, f"option {sorted(missing_options)[0]} is not in the best evidence")
        distinct = set(words)
        new = (distinct & evidence_words) - self._question - FILLER
        if len(new) < 2 and not (said_numbers or said_options - self._question_options):
            return Verdict(clean, False, "adds nothing from the evidence to the question")
        overlap = len(distinct & (evidence_words | self._question)) / len(distinct)
        sim = similarity[i] if similarity is not None else 0.0
        known = evidence_words | self._question
        if overlap >= self.config.min_overlap and (similarity is None or sim >= self.config.min_support_similarity):
            own = _own_words(distinct, known)
            if 0 <= self.config.max_new_words < len(own):
                return Verdict(clean, False, f"adds words of its own to the evidence's: {', '.join(sorted(own))}",
                               overlap=overlap)
            return Verdict(clean, True, "words in the evidence", evidence.number, evidence, overlap)
        if overlap >= self.config.min_paraphrase_overlap and sim >= self.config.min_similarity:
            own = _own_words(distinct, known)
            limit = self.config.max_paraphrase_new_words
            if 0 <= limit < len(own):
                return Verdict(clean, False, f"a paraphrase adding words of its own: {', '.join(sorted(own))}",
                               overlap=overlap)
            return Verdict(clean, True, f"paraphrase (cosine {sim:.2f})", evidence.number, evidence, overlap)
        return Verdict(clean, False, f"only {overlap:.0%} of its words are in the evidence", overlap=overlap)


def _own_words(said: set[str], known: set[str]) -> set[str]:
    """Content words of a sentence that neither the evidence nor the question has (in any form)."""
    return {w for w in said - known - FILLER if not any(_same_root(w, k) for k in known)}


def _same_root(a: str, b: str) -> bool:
    """Two forms of one word, as far as the stemmer missed it ("overwritten" and "overwrit")."""
    n = min(len(a), len(b), 5)
    return n >= 4 and a[:n] == b[:n]
