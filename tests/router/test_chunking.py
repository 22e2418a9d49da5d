from pathlib import Path

import pytest

from router.chunking import Chunker
from router.parsing import parse
from router.server import _packaged_tokenizer

SAMPLES = Path(__file__).resolve().parents[2] / "router" / "samples"


@pytest.fixture(scope="module")
def chunker():
    return Chunker.from_file(_packaged_tokenizer(), chunk_tokens=80, overlap_tokens=16)


def test_chunks_respect_the_token_limit_and_overlap(chunker):
    text = parse((SAMPLES / "honeybees.md").read_bytes(), "md")
    chunks = chunker.split(text)
    assert len(chunks) > 3
    assert all(chunker.count(c) <= 80 for c in chunks)
    for a, b in zip(chunks, chunks[1:]):
        # b starts inside a: the text they share is a's end and b's start, about 16 tokens of it
        # (fewer when the cut steps forward to the start of a word).
        shared = max((m for m in range(1, min(len(a), len(b)) + 1) if a.endswith(b[:m])), default=0)
        assert 10 <= chunker.count(b[:shared]) <= 16, f"chunks share {b[:shared]!r}"
    # nothing is lost: every word of the document is in some chunk
    words = set(text.split())
    assert words <= set(" ".join(chunks).split())


def test_chunks_prefer_sentence_ends(chunker):
    text = " ".join(f"Sentence number {i} talks about bees and their hives." for i in range(60))
    chunks = chunker.split(text)
    assert sum(c.endswith(".") for c in chunks[:-1]) >= len(chunks[:-1]) - 1


def test_short_and_empty_text(chunker):
    assert chunker.split("One sentence.") == ["One sentence."]
    assert chunker.split("") == []


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        Chunker.from_file(_packaged_tokenizer(), chunk_tokens=8)
    with pytest.raises(ValueError):
        Chunker.from_file(_packaged_tokenizer(), chunk_tokens=100, overlap_tokens=60)
