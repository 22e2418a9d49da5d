"""In-process stand-ins for the router's clients, speaking the same domain types: the router's flow
runs over them with no processes and no network (the fast tier)."""

from __future__ import annotations

import numpy as np

from fabric.errors import Behind, Unavailable, Unimplemented
from router.domain import Generated, Hit
from router.evidence import Scored, Span
from router.topology import ShardGroup


class Words:
    """A chunker's token count by words, and chunking by sentence, for flows that need one."""

    def count(self, text: str) -> int:
        return len(text.split())

    def split(self, text: str) -> list[str]:
        return [s.strip() + "." for s in text.split(".") if s.strip()]


def unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def words_vector(text: str, dim: int = 64) -> np.ndarray:
    """A bag-of-words embedding: texts sharing words are close, as with a real model (crudely)."""
    v = np.full(dim, 1e-3, dtype=np.float32)
    for word in text.lower().split():
        v[sum(map(ord, word.strip(".,?!"))) % dim] += 1.0
    return unit(v)


class FakeEmbedder:
    """Embeds as bags of words; reranks by a table (text → score, spans) or, for texts not in it, by
    the share of the query's words a text holds. Keeps what it was asked."""

    def __init__(self, rerank_table: dict[str, tuple[float, tuple[Span, ...]]] | None = None):
        self.rerank_table = rerank_table or {}
        self.embedded: list[list[str]] = []
        self.reranked: list[int] = []
        self.titles: list[str] = []
        self.down = False

    async def embed(self, texts, deadline) -> np.ndarray:
        if self.down:
            raise Unavailable("embedder down")
        self.embedded.append(list(texts))
        return np.stack([words_vector(t) for t in texts])

    async def model(self, deadline) -> str:
        return "bag-of-words/64"

    async def rerank(self, query, texts, deadline, titles=()) -> list[Scored]:
        if self.down:
            raise Unavailable("embedder down")
        self.reranked.append(len(texts))
        self.titles = list(titles)
        words = set(query.lower().split())

        def verdict(i: int) -> Scored:
            if texts[i] in self.rerank_table:
                score, spans = self.rerank_table[texts[i]]
            else:
                score = len(words & set(texts[i].lower().split())) / max(1, len(words))
                spans = (Span(0, len(texts[i]), score),)
            return Scored(i, score, spans)

        return sorted((verdict(i) for i in range(len(texts))), key=lambda s: -s.score)

    async def close(self):
        pass


class FakeShard:
    """One shard replica: its chunks in a dict, searched densely by the bag-of-words vectors and
    lexically by the share of the query's words a chunk holds."""

    def __init__(self, shard_id: int, texts: dict[str, tuple[str, str]] | None = None):
        self.shard_id = shard_id
        self.target = f"fake-shard-{shard_id}"
        #: chunk_id → (source, text)
        self.chunks: dict[str, tuple[str, str]] = dict(texts or {})
        self.writes: list[list] = []
        self.down = False
        #: The log sequence this replica has applied; a read asking for more is refused, as a real one is.
        self.applied: int | None = None

    def _check(self, min_sequence=None):
        if self.down:
            raise Unavailable(f"shard {self.shard_id} down")
        if min_sequence and self.applied is not None and min_sequence > self.applied:
            raise Behind(f"shard {self.shard_id} has applied {self.applied}, not yet {min_sequence}")

    def _ranked(self, score, k: int) -> list[Hit]:
        hits = [Hit(float(score(text)), chunk_id.split("#")[0], chunk_id, source, text, self.shard_id)
                for chunk_id, (source, text) in self.chunks.items()]
        return sorted(hits, key=lambda h: -h.score)[:k]

    async def search(self, vector, k, ef, scope, deadline, min_sequence=None) -> list[Hit]:
        self._check(min_sequence)
        return self._ranked(lambda text: words_vector(text) @ vector, k)

    async def hybrid_search(self, vector, query, k, ef, scope, deadline, min_sequence=None) -> tuple[list[Hit], list[Hit]]:
        self.hybrid_calls = getattr(self, "hybrid_calls", 0) + 1
        return (await self.search(vector, k, ef, scope, deadline, min_sequence),
                await self.lexical_search(query, k, scope, deadline, min_sequence))

    async def lexical_search(self, query, k, scope, deadline, min_sequence=None) -> list[Hit]:
        self._check(min_sequence)
        words = set(query.lower().split())
        return self._ranked(lambda text: len(words & set(text.lower().split())) / max(1, len(words)), k)

    async def upsert(self, chunks, deadline) -> dict[str, int]:
        self._check()
        self.writes.append(list(chunks))
        previous = {}
        for doc in {c.document_id for c in chunks}:
            old = [cid for cid in self.chunks if cid.split("#")[0] == doc]
            previous[doc] = len(old)
            for cid in old:
                del self.chunks[cid]
        for c in chunks:
            self.chunks[c.chunk_id] = (c.source, c.text)
        return previous

    async def delete(self, document_ids, tenant, deadline) -> int:
        self._check()
        old = [cid for cid in self.chunks if cid.split("#")[0] in document_ids]
        for cid in old:
            del self.chunks[cid]
        return len(old)

    async def close(self):
        pass


def shard_groups(*shards: FakeShard) -> list[ShardGroup]:
    """Real ShardGroups (failover, quorum, breakers) over fake replicas, one replica per shard."""
    from router.topology import Breaker, Replica

    return [ShardGroup(s.shard_id, [Replica(s, Breaker())]) for s in shards]


class FakeGenerator:
    """Streams the given pieces, whatever the prompt; keeps each request's messages."""

    def __init__(self, *pieces: str):
        self.pieces = pieces
        self.requests: list[dict] = []

    async def generate(self, messages, max_tokens, stop, temperature, deadline):
        self.requests.append({"messages": list(messages), "max_tokens": max_tokens, "stop": list(stop)})
        for piece in self.pieces:
            yield Generated(piece)
        yield Generated("", completion_tokens=len(self.pieces))

    async def score(self, contexts, continuation, deadline, timeout_s=None):
        raise Unimplemented("this fake generator cannot score")  # as a backend without probabilities

    async def close(self):
        pass
