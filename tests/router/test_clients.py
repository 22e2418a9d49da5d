"""The router's clients over real channels to failing fakes: every failed call is a DependencyFailed naming
the dependency and the method (a stream's too, failing mid-way), with the code and rich details the
router's caller should see, and failover judges it as it judged the raw call."""

from __future__ import annotations

import contextlib

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from fabric.client import Deadline
from fabric.errors import (
    Behind,
    DependencyFailed,
    InvalidArgument,
    Overloaded,
    RagloomError,
    is_caller_fault,
    to_status,
)
from ragloom.embedder.v1 import embedder_pb2_grpc
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from router.clients import EmbedderClient, GeneratorClient, ShardClient
from router.domain import ChunkWrite, Scope
from router.topology import Breaker, Replica, ShardGroup
from tests.support.ports import free_port_block


class Failing(embedder_pb2_grpc.EmbedderServiceServicer, indexer_pb2_grpc.IndexerServiceServicer,
              generator_pb2_grpc.GeneratorServiceServicer):
    """Every method fails with `error` (as the shared interceptor reports it); Generate sends a piece first."""

    def __init__(self, error: Exception):
        self.error = error

    async def _fail(self, request, context):
        status = to_status(self.error, "fake")
        await context.abort(status.code, status.details, status.trailing_metadata)

    Embed = Info = Rerank = Upsert = Delete = Search = LexicalSearch = _fail

    async def Generate(self, request, context):
        yield generator_pb2.GenerateResponse(text="Hel")
        await self._fail(request, context)


class Answering(indexer_pb2_grpc.IndexerServiceServicer):
    async def Search(self, request, context):
        return indexer_pb2.SearchResponse(results=[indexer_pb2.QueryResult(hits=[indexer_pb2.Hit(chunk_id="c")])])


@contextlib.asynccontextmanager
async def serving(servicer):
    server = grpc.aio.server()
    for module, name in ((embedder_pb2_grpc, "EmbedderService"), (indexer_pb2_grpc, "IndexerService"),
                         (generator_pb2_grpc, "GeneratorService")):
        if isinstance(servicer, getattr(module, f"{name}Servicer")):
            getattr(module, f"add_{name}Servicer_to_server")(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def retry_delays_ms(error: RagloomError) -> list[int]:
    """The RetryInfo delays in the status the router would answer with `error`."""
    (_, value), = to_status(error, "router").trailing_metadata
    found = []
    for detail in status_pb2.Status.FromString(value).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            found.append(info.retry_delay.ToMilliseconds())
    return found


SCOPE = Scope()
WRITE = ChunkWrite(chunk_id="c", document_id="d", text="t", source="s", vector=[1.0, 0.0])

CALLS = {
    ("embedder", "Embed"): lambda e, s, g: e.embed(["a"], Deadline(5)),
    ("embedder", "Info"): lambda e, s, g: e.model(Deadline(5)),
    ("embedder", "Rerank"): lambda e, s, g: e.rerank("q", ["a"], Deadline(5)),
    ("shard", "Upsert"): lambda e, s, g: s.upsert([WRITE], Deadline(5)),
    ("shard", "Delete"): lambda e, s, g: s.delete(["d"], "", Deadline(5)),
    ("shard", "Search"): lambda e, s, g: s.search(np.ones(2, np.float32), 3, 8, SCOPE, Deadline(5)),
    ("shard", "LexicalSearch"): lambda e, s, g: s.lexical_search("q", 3, SCOPE, Deadline(5)),
}


@pytest.mark.parametrize("who, method", CALLS, ids=[f"{w}-{m}" for w, m in CALLS])
async def test_every_failed_call_names_the_dependency_and_the_method(who, method):
    async with serving(Failing(ZeroDivisionError("division by zero"))) as target:
        embedder, shard, generator = EmbedderClient(target, 5), ShardClient(1, target, 5), GeneratorClient(target, 5)
        try:
            with pytest.raises(DependencyFailed) as caught:
                await CALLS[who, method](embedder, shard, generator)
        finally:
            await embedder.close(), await shard.close(), await generator.close()
    where = f"shard 1 {method} ({target})" if who == "shard" else f"embedder {method}"
    assert caught.value.message == f"{where}: INTERNAL: internal error: ZeroDivisionError: division by zero"
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE  # the dependency's bug is not the router's
    assert "router" not in to_status(caught.value, "router").details


async def test_an_unreachable_embedder_is_named():
    embedder = EmbedderClient(f"127.0.0.1:{free_port_block(1)}", 5)
    try:
        with pytest.raises(DependencyFailed) as caught:
            await embedder.embed(["a"], Deadline(5))
    finally:
        await embedder.close()
    assert caught.value.message.startswith("embedder Embed: UNAVAILABLE: ")
    assert to_status(caught.value, "router").code is grpc.StatusCode.UNAVAILABLE


async def test_a_generation_failing_mid_stream_names_the_generator_and_keeps_the_retry_hint():
    async with serving(Failing(Overloaded("too many generations in flight", retry_after_s=2.5))) as target:
        generator = GeneratorClient(target, 5)
        pieces = []
        try:
            with pytest.raises(DependencyFailed) as caught:
                async for piece in generator.generate([{"role": "user", "content": "hi"}], 8, [], 0.0, Deadline(5)):
                    pieces.append(piece.text)
        finally:
            await generator.close()
    assert pieces == ["Hel"]
    assert caught.value.message == "generator Generate: RESOURCE_EXHAUSTED: too many generations in flight"
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delays_ms(caught.value) == [2500]


async def test_failover_judges_a_named_failure_as_it_judged_the_raw_call():
    search = lambda c: c.search(np.ones(2, np.float32), 3, 8, SCOPE, Deadline(5))  # noqa: E731
    async with serving(Failing(Behind("not yet"))) as behind, serving(Answering()) as up, \
            serving(Failing(InvalidArgument("k", "too big"))) as refusing, \
            serving(Failing(ZeroDivisionError("bug"))) as broken:
        replicas = {t: Replica(ShardClient(0, t, 5), Breaker(eject_after=1, eject_for_s=60))
                    for t in (behind, up, refusing, broken)}
        try:
            # behind: failed over, never ejected; broken (INTERNAL): failed over and ejected
            group = ShardGroup(0, [replicas[behind], replicas[broken], replicas[up]])
            for _ in range(3):
                assert [h.chunk_id for h in await group.read(search, Deadline(5))] == ["c"]
            assert replicas[behind].breaker.available() and not replicas[broken].breaker.available()
            # the caller's fault: raised as it is, not failed over, not counted against the replica
            with pytest.raises(DependencyFailed) as caught:
                await ShardGroup(0, [replicas[refusing], replicas[up]]).read(search, Deadline(5))
            assert is_caller_fault(caught.value) and replicas[refusing].breaker.failures == 0
            assert caught.value.message == f"shard 0 Search ({refusing}): INVALID_ARGUMENT: k: too big"
        finally:
            for replica in replicas.values():
                await replica.client.close()


async def test_hybrid_search_asks_a_shard_from_before_texts_for_its_bm25_half_separately():
    """A shard that predates SearchRequest.texts ignores them and answers the dense half alone."""

    def reply(chunk_id: str) -> indexer_pb2.SearchResponse:
        response = indexer_pb2.SearchResponse(shard_id=0)
        response.results.add().hits.add(chunk_id=chunk_id, document_id="d", score=1.0)
        return response

    class OldShard:
        def __init__(self):
            self.calls = []

        async def Search(self, request, **_):
            self.calls.append(("Search", list(request.texts)))
            return reply("dense-hit")

        async def LexicalSearch(self, request, **_):
            self.calls.append(("LexicalSearch", list(request.queries)))
            return reply("bm25-hit")

    client = ShardClient(0, "127.0.0.1:1", 5)
    client._stub = old = OldShard()
    try:
        dense, lexical = await client.hybrid_search(np.ones(4, dtype=np.float32), "bees", 3, 64, Scope(), Deadline(5))
    finally:
        await client.close()
    assert [h.chunk_id for h in dense] == ["dense-hit"] and [h.chunk_id for h in lexical] == ["bm25-hit"]
    assert old.calls == [("Search", ["bees"]), ("LexicalSearch", ["bees"])]
