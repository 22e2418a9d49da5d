"""Lexical pieces the reranker (embedder) and the answer verifier (router) both need: sentence spans,
content words with a light stemmer, numbers and command-line option names.

Deliberately simple and deterministic: the same text always gives the same words, so a scorer and a
verifier that run in different services agree on what a word is.
"""

from __future__ import annotations

import re

# Common English function words and question words: they say nothing about whether a passage answers.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing done down during each either else etc even ever every few
for from further get gets got had has have having he her here hers him his how however i if in into is it
its itself just let lets like made make makes many may me might more most much must my no nor not now of
off often on once one only onto or other others otherwise our out over own per please rather same say says
shall she should since so some such than that the their theirs them then there these they this those
though through thus to too under until up upon us use used uses using very via want was way we were what
whatever when where whether which while who whom whose why will with within without would yes yet you your
""".split())

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
# A sentence ends at . ! ? followed by space and something that can start a sentence.
_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<!etc\.)(?<!vs\.)(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[-])")
_PARAGRAPH = re.compile(r"\n\s*\n")
_MAX_SENTENCE_CHARS = 400


def stem(word: str) -> str:
    """A light suffix stripper, enough to match 'overwrites', 'overwrite' and 'overwriting' (all 'overwrit')."""
    w = word.lower()
    if len(w) <= 3 or w.isdigit():
        return w
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith(("sses", "xes", "ches", "shes", "zes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for suffix in ("ing", "ied", "ed", "ly"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)] + ("y" if suffix == "ied" else "")
            break
    return w[:-1] if w.endswith("e") and len(w) > 3 else w


def words(text: str) -> list[str]:
    return [m.group(0).lower() for m in _WORD.finditer(text)]


def content_words(text: str) -> list[str]:
    """Stems of the words that carry meaning (no stopwords, no one-letter words except digits)."""
    return [stem(w) for w in words(text) if w not in STOPWORDS and (len(w) > 1 or w.isdigit())]


def numbers(text: str) -> set[str]:
    """Numbers as written ('3', '1,024' → '1024', '0.5')."""
    return {m.group(0).replace(",", "") for m in _NUMBER.finditer(text)}


def options(text: str) -> set[str]:
    """Command-line option names ('-n', '--iterations'), without any '=VALUE'."""
    return {m.group(1).rstrip("-") for m in _OPTION.finditer(text) if len(m.group(1).strip("-")) >= 1}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the sentences of `text`: split at paragraph breaks and at sentence
    ends; a very long run without either is cut at '; ' or, failing that, into pieces of bounded length."""
    spans: list[tuple[int, int]] = []
    for para_start, para_end in _pieces(text, 0, len(text), _PARAGRAPH):
        for start, end in _pieces(text, para_start, para_end, _SENTENCE_END):
            spans.extend(_bounded(text, start, end))
    return spans


def _pieces(text: str, start: int, end: int, separator: re.Pattern) -> list[tuple[int, int]]:
    out, cursor = [], start
    for match in separator.finditer(text, start, end):
        out.append((cursor, match.start()))
        cursor = match.end()
    out.append((cursor, end))
    return [s for s in (_strip(text, a, b) for a, b in out) if s]


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _bounded(text: str, start: int, end: int) -> list[tuple[int, int]]:
    if end - start <= _MAX_SENTENCE_CHARS:
        return [(start, end)]
    cut = text.rfind("; ", start, start + _MAX_SENTENCE_CHARS)
    if cut <= start:
        cut = text.rfind(" ", start, start + _MAX_SENTENCE_CHARS)
    if cut <= start:
        cut = start + _MAX_SENTENCE_CHARS
    head = _strip(text, start, cut + 1)
    tail = _strip(text, cut + 1, end)
    return ([head] if head else []) + (_bounded(text, *tail) if tail else [])


# ---- answer types: what kind of thing a factoid question asks for ----------------------------------

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand "
                 "once twice thrice").split()
_ASKS = {
    "number": re.compile(r"\bhow (?:many|much|long|often|far|big|large|old|high|wide|deep)\b|\bwhat (?:number|size|"
                         r"percentage|year|port|value|limit|length|exit (?:status|code)|status)\b|\bexit (?:status|code)\b"
                         r"|\bhow many\b|\bwhen\b", re.I),
    "option": re.compile(r"\b(?:option|flag|switch|argument)s?\b", re.I),
    "signal": re.compile(r"\bsignals?\b", re.I),
}
_HAS = {
    "number": re.compile(r"(?<![\w.-])\d+(?:[.,]\d+)?(?![\w])|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", re.I),
    "option": re.compile(r"(?<![\w-])--?[A-Za-z]"),
    "signal": re.compile(r"\bSIG[A-Z]{2,}|\b(?:HUP|INT|QUIT|KILL|TERM|USR1|USR2|STOP|CONT|ALRM|CHLD|PIPE)\b"),
}


def answer_types(question: str) -> set[str]:
    """What the question asks for: a number, an option name, a signal (empty when it is not that kind)."""
    return {kind for kind, pattern in _ASKS.items() if pattern.search(question)}


def has_answer_type(sentence: str, kinds: set[str]) -> bool:
    """The sentence holds something of a kind the question asks for."""
    return any(_HAS[kind].search(sentence) for kind in kinds)
