"""Token-aware chunking with overlap, preferring to end chunks at sentence or paragraph ends."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

_SENTENCE_END = {".", "!", "?", ";", ":", ".\"", "?\"", "!\"", ".)"}


@dataclass(frozen=True)
class Chunker:
    """Splits text into chunks of at most `chunk_tokens` tokens (of the embedding model's tokenizer),
    consecutive chunks sharing about `overlap_tokens` tokens."""

    tokenizer: Tokenizer
    chunk_tokens: int = 200
    overlap_tokens: int = 40

    def __post_init__(self):
        if self.chunk_tokens < 16:
            raise ValueError("chunk_tokens must be at least 16")
        if not 0 <= self.overlap_tokens < self.chunk_tokens // 2:
            raise ValueError("overlap_tokens must be between 0 and half of chunk_tokens")

    @classmethod
    def from_file(cls, path: str, chunk_tokens: int = 200, overlap_tokens: int = 40) -> "Chunker":
        tokenizer = Tokenizer.from_file(path)
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(tokenizer, chunk_tokens, overlap_tokens)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def split(self, text: str) -> list[str]:
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        if not offsets:
            return []
        chunks, start, n = [], 0, len(offsets)
        while start < n:
            end = min(start + self.chunk_tokens, n)
            if end < n:
                end = self._boundary(text, offsets, start, end)
            chunks.append(text[offsets[start][0] : offsets[end - 1][1]].strip())
            if end >= n:
                break
            start = max(end - self.overlap_tokens, start + 1)
            start = self._word_start(text, offsets, start)
        return [c for c in chunks if c]

    def _boundary(self, text: str, offsets, start: int, end: int) -> int:
        """Moves `end` back to just after a sentence end, if one lies in the chunk's last 40 %."""
        floor = start + int(self.chunk_tokens * 0.6)
        for i in range(end - 1, floor, -1):
            token_start, token_end = offsets[i]
            if text[token_start:token_end] in _SENTENCE_END or text[token_end : token_end + 1] == "\n":
                return i + 1
        return end

    @staticmethod
    def _word_start(text: str, offsets, i: int) -> int:
        """Steps forward past word-piece continuations so a chunk never starts mid-word."""
        while 0 < i < len(offsets) - 1 and offsets[i][0] == offsets[i - 1][1] and text[offsets[i][0]].isalnum():
            i += 1
        return i
