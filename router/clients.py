"""Typed clients for the services the router calls. Each speaks the router's domain types and owns
the conversion to and from its service's protos; every call carries a deadline, and a failed one
raises DependencyFailed naming the dependency and the method (not the router: "router call failed"
tells a user nothing about which dependency broke)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import numpy as np

from fabric.client import Deadline, channel
from fabric.errors import DependencyFailed
from fabric.telemetry import outgoing_metadata
from router.domain import ChunkWrite, Generated, Hit, Likelihoods, Scope
from router.evidence import Scored, Span
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc


@contextlib.contextmanager
def _naming(dependency: str, method: str, target: str = "") -> Iterator[None]:
    """A failed call inside the block becomes DependencyFailed saying who failed doing what."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise DependencyFailed(exc, dependency, method, target) from exc


class EmbedderClient:
    def __init__(self, target: str, timeout_s: float, batch_texts: int = 64, parallel: int = 2, identity=None):
        self.target = target
        self.timeout_s = timeout_s
        self.batch_texts = batch_texts
        self._channel = channel(target, identity=identity)
        self._stub = embedder_pb2_grpc.EmbedderServiceStub(self._channel)
        self._parallel = asyncio.Semaphore(parallel)
        self._model: str | None = None

    async def model(self, deadline: Deadline) -> str:
        """Which model (and variant) makes the vectors: asked once, then remembered."""
        if self._model is None:
            with _naming("embedder", "Info"):
                info = await self._stub.Info(embedder_pb2.InfoRequest(), timeout=deadline.timeout(self.timeout_s),
                                             metadata=outgoing_metadata())
            self._model = f"{info.model}/{info.variant}/{info.dimension}"
        return self._model

    async def embed(self, texts: Sequence[str], deadline: Deadline) -> np.ndarray:
        """Vectors for `texts` (n, dim), sent in batches with a few calls in flight."""

        async def one(batch: Sequence[str]) -> np.ndarray:
            async with self._parallel:
                with _naming("embedder", "Embed"):
                    reply = await self._stub.Embed(embedder_pb2.EmbedRequest(texts=batch), metadata=outgoing_metadata(),
                                                   timeout=deadline.timeout(self.timeout_s))
            return np.array([e.values for e in reply.embeddings], dtype=np.float32).reshape(len(batch), -1)

        batches = [texts[i : i + self.batch_texts] for i in range(0, len(texts), self.batch_texts)]
        return np.concatenate(await asyncio.gather(*(one(b) for b in batches)))

    async def rerank(self, query: str, texts: Sequence[str], deadline: Deadline,
                     titles: Sequence[str] = ()) -> list[Scored]:
        """The embedder's verdict on each text (index into `texts`, score, best sentences, relevance), best first."""
        with _naming("embedder", "Rerank"):
            reply = await self._stub.Rerank(
                embedder_pb2.RerankRequest(query=query, texts=texts, titles=titles),
                timeout=deadline.timeout(self.timeout_s), metadata=outgoing_metadata(),
            )
        return [Scored(r.index, r.score, tuple(Span(s.start, s.end, s.score) for s in r.spans),
                       r.relevance if r.HasField("relevance") else None) for r in reply.results]

    async def close(self) -> None:
        await self._channel.close()


class ShardClient:
    def __init__(self, shard_id: int, target: str, timeout_s: float, write_timeout_s: float = 30.0, identity=None):
        self.shard_id = shard_id
        self.target = target
        self.name = f"shard {shard_id}"
        self.timeout_s = timeout_s
        self.write_timeout_s = write_timeout_s
        self._channel = channel(target, identity=identity)
        self._stub = indexer_pb2_grpc.IndexerServiceStub(self._channel)

    async def upsert(self, chunks: Sequence[ChunkWrite], deadline: Deadline) -> dict[str, int]:
        """Writes `chunks` to a standalone shard, replacing their documents' earlier chunks; returns how
        many each document had."""
        request = indexer_pb2.UpsertRequest(
            chunks=[_chunk(c) for c in chunks], replace_documents=True, shard_id=self.shard_id,
        )
        with _naming(self.name, "Upsert", self.target):
            reply = await self._stub.Upsert(request, timeout=deadline.timeout(self.write_timeout_s),
                                            metadata=outgoing_metadata())
        return dict(reply.previous_chunks)

    async def delete(self, document_ids: Sequence[str], tenant: str, deadline: Deadline) -> int:
        """Removes the documents' chunks from a standalone shard; returns how many were removed."""
        request = indexer_pb2.DeleteRequest(document_ids=document_ids, tenant=tenant, shard_id=self.shard_id)
        with _naming(self.name, "Delete", self.target):
            reply = await self._stub.Delete(request, timeout=deadline.timeout(self.write_timeout_s),
                                            metadata=outgoing_metadata())
        return reply.removed

    async def search(self, vector: np.ndarray, k: int, ef: int, scope: Scope, deadline: Deadline,
                     min_sequence: int | None = None) -> list[Hit]:
        """The shard's `k` nearest chunks to one query vector, best first, once it has applied its log
        through `min_sequence`."""
        request = indexer_pb2.SearchRequest(
            # A list converts ~5x faster than a numpy array (protobuf iterates the array's scalars).
            queries=[indexer_pb2.Vector(values=np.asarray(vector, dtype=np.float32).tolist())], k=k, ef=ef, shard_id=self.shard_id,
            tenant=scope.tenant, tags=scope.tags, min_sequence=min_sequence,
        )
        with _naming(self.name, "Search", self.target):
            reply = await self._stub.Search(request, timeout=deadline.timeout(self.timeout_s),
                                            metadata=outgoing_metadata())
        return self._hits(reply)

    async def hybrid_search(self, vector: np.ndarray, query: str, k: int, ef: int, scope: Scope, deadline: Deadline,
                            min_sequence: int | None = None) -> tuple[list[Hit], list[Hit]]:
        """`search` and `lexical_search` in one call: (dense hits, BM25 hits). A shard from before
        SearchRequest.texts answers the dense half only; its BM25 half is then asked for separately."""
        request = indexer_pb2.SearchRequest(
            queries=[indexer_pb2.Vector(values=np.asarray(vector, dtype=np.float32).tolist())], k=k, ef=ef,
            shard_id=self.shard_id, tenant=scope.tenant, tags=scope.tags, min_sequence=min_sequence, texts=[query],
        )
        with _naming(self.name, "Search", self.target):
            reply = await self._stub.Search(request, timeout=deadline.timeout(self.timeout_s),
                                            metadata=outgoing_metadata())
        if len(reply.lexical_results) != 1:
            return self._hits(reply), await self.lexical_search(query, k, scope, deadline, min_sequence)
        return self._hits(reply), self._hits(reply, lexical=True)

    async def lexical_search(self, query: str, k: int, scope: Scope, deadline: Deadline,
                             min_sequence: int | None = None) -> list[Hit]:
        """The shard's `k` best chunks for `query` by BM25, best first (as `search`: after `min_sequence`)."""
        request = indexer_pb2.LexicalSearchRequest(
            queries=[query], k=k, shard_id=self.shard_id, tenant=scope.tenant, tags=scope.tags,
            min_sequence=min_sequence,
        )
        with _naming(self.name, "LexicalSearch", self.target):
            reply = await self._stub.LexicalSearch(request, timeout=deadline.timeout(self.timeout_s),
                                                   metadata=outgoing_metadata())
        return self._hits(reply)

    def _hits(self, reply: indexer_pb2.SearchResponse, lexical: bool = False) -> list[Hit]:
        result = (reply.lexical_results if lexical else reply.results)[0]
        return [Hit(h.score, h.document_id, h.chunk_id, h.source, h.text, self.shard_id) for h in result.hits]

    async def close(self) -> None:
        await self._channel.close()


def _chunk(c: ChunkWrite) -> indexer_pb2.Chunk:
    return indexer_pb2.Chunk(chunk_id=c.chunk_id, document_id=c.document_id, text=c.text, source=c.source,
                             metadata=c.metadata, vector=c.vector, tenant=c.tenant, tags=c.tags)


class GeneratorClient:
    def __init__(self, target: str, timeout_s: float, identity=None):
        self.target = target
        self.timeout_s = timeout_s
        self._channel = channel(target, identity=identity)
        self._stub = generator_pb2_grpc.GeneratorServiceStub(self._channel)

    async def parallel(self, timeout_s: float = 2.0) -> int:
        """How many generations the generator runs at once (its Info; 0 when a server behind it decides)."""
        with _naming("generator", "Info"):
            info = await self._stub.Info(generator_pb2.InfoRequest(), timeout=timeout_s, metadata=outgoing_metadata())
        return info.parallel

    async def generate(
        self, messages: Sequence[dict[str, str]], max_tokens: int, stop: Sequence[str], temperature: float,
        deadline: Deadline,
    ) -> AsyncIterator[Generated]:
        """The reply to a chat (`messages`: role and content each), piece by piece as it is generated."""
        request = generator_pb2.GenerateRequest(
            messages=[generator_pb2.Message(**m) for m in messages], max_tokens=max_tokens, stop=stop,
            temperature=temperature,
        )
        call = self._stub.Generate(request, timeout=deadline.timeout(self.timeout_s), metadata=outgoing_metadata())
        try:
            with _naming("generator", "Generate"):  # errors arrive while the stream is read
                async for reply in call:
                    if reply.HasField("usage"):
                        yield Generated(reply.text, reply.usage.completion_tokens, reply.usage.queue_ms)
                    else:
                        yield Generated(reply.text)
        finally:
            call.cancel()  # our caller went away: stop the generator spending compute

    async def score(self, contexts: Sequence[str], continuation: str, deadline: Deadline,
                    timeout_s: float | None = None) -> Likelihoods:
        """The generator's model's mean log-probability of `continuation` after each of `contexts`, in order
        (within `timeout_s`, when given, as well as the deadline)."""
        request = generator_pb2.ScoreRequest(contexts=contexts, continuation=continuation)
        timeout = deadline.timeout(self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s))
        with _naming("generator", "Score"):
            reply = await self._stub.Score(request, timeout=timeout, metadata=outgoing_metadata())
        return Likelihoods(list(reply.mean_logprob), reply.continuation_tokens)

    async def close(self) -> None:
        await self._channel.close()
