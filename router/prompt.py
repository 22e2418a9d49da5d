"""Builds the generation prompt with numbered sources within a token budget, and reads citations back."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources provided. "
    "Cite the sources you use with their numbers in square brackets, like [1]. "
    "If the sources do not contain the answer, say that you do not know."
)

# A small model sometimes starts copying the sources back out; these end the answer there.
STOP_SEQUENCES = ["\n\n[", "\nSources:", "\nQuestion:"]

_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass(frozen=True)
class Passage:
    number: int
    source: str
    text: str


def build_messages(
    question: str,
    passages: Sequence[Passage],
    count_tokens: Callable[[str], int],
    budget_tokens: int,
) -> tuple[list[dict[str, str]], list[Passage]]:
    """Chat messages for the question, with as many passages (best first) as fit in `budget_tokens`;
    the passage that would overflow the budget is cut to fit. Returns the messages and the passages used."""
    header = f"Question: {question}\n\nAnswer the question from the sources above, citing them like [1]."
    used_tokens = count_tokens(SYSTEM_PROMPT) + count_tokens(header) + 16
    blocks, used = [], []
    for passage in passages:
        label = f"[{passage.number}] "
        room = budget_tokens - used_tokens - count_tokens(label)
        if room < 24:
            break
        text = passage.text
        cost = count_tokens(text)
        if cost > room:
            text = _cut(text, room, count_tokens)
            cost = count_tokens(text)
        blocks.append(label + text)
        used.append(passage)
        used_tokens += cost + count_tokens(label) + 2
    user = "Sources:\n\n" + "\n\n".join(blocks) + "\n\n" + header
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}], used


def _cut(text: str, tokens: int, count_tokens: Callable[[str], int]) -> str:
    words = text.split()
    lo, hi = 0, len(words)
    while lo < hi:  # longest word prefix within the budget
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]) + " …"


def cited_numbers(answer: str, valid: int) -> list[int]:
    """Source numbers the answer cites ([2], [1, 3]), in order of first mention, only those in 1..valid."""
    seen: list[int] = []
    for match in _CITATION.finditer(answer):
        for part in match.group(1).split(","):
            number = int(part)
            if 1 <= number <= valid and number not in seen:
                seen.append(number)
    return seen
