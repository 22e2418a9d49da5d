"""The router's flow end to end in process (the fast tier): ingest → shards, search, ask, partial
coverage, the cache and its invalidation, over fake clients that speak the router's domain types and
the real ShardGroups (failover, quorum, breakers). No processes, no network."""

import pytest

from fabric.client import Deadline
from fabric.errors import FailedPrecondition, InvalidArgument, Unavailable
from router.cache import Cache, MemoryBackend
from router.cached import CachedQueryVectors, CachedRag
from router.config import RagConfig
from router.domain import AskDone, AskQuery, AskSources, AskToken, DocumentInput, Scope, SearchQuery
from router.rag import Rag
from router.sharding import shard_for
from tests.support.fakes import FakeEmbedder, FakeGenerator, FakeShard, Words, shard_groups
from tests.support.metrics import sample

BEES = ("Honeybees tell each other where flowers are with the waggle dance. "
        "The angle of the dance shows the direction of the food.")
BREAD = "Sourdough is leavened by wild yeast and lactic acid bacteria. A starter is fed flour and water."
LAMPS = "Lighthouse lamps burned whale oil before kerosene. Fresnel lenses focus their light."


class Flow:
    def __init__(self, shards: int = 2, pieces=("Bees dance the waggle dance to show where flowers are.",),
                 **config):
        self.shards = [FakeShard(i) for i in range(shards)]
        self.embedder = FakeEmbedder()
        self.generator = FakeGenerator(*pieces)
        self.cache = Cache(MemoryBackend())
        config = {"abstain_below": 0.3, "verify": False, **config}
        rag = Rag(RagConfig(**config), Words(), self.embedder, shard_groups(*self.shards), self.generator,
                  CachedQueryVectors(self.embedder, self.cache))
        self.rag = CachedRag(rag, self.cache)

    async def ingest(self, *texts: tuple[str, str], tenant: str = ""):
        docs = [DocumentInput(id=name, source=f"{name}.txt", body=text) for name, text in texts]
        return await self.rag.ingest(docs, Deadline(10), tenant)

    async def ask(self, question: str, **query):
        events = [e async for e in self.rag.ask(AskQuery(question, **query), Deadline(10))]
        assert isinstance(events[0], AskSources) and isinstance(events[-1], AskDone)
        return events[0], "".join(e.text for e in events if isinstance(e, AskToken)), events[-1]


async def test_ingest_routes_each_document_to_its_shard_and_reports_replacements():
    flow = Flow()
    results, timings, sequences = await flow.ingest(("bees", BEES), ("bread", BREAD), ("lamps", LAMPS))
    assert [r.id for r in results] == ["bees", "bread", "lamps"] and all(r.chunks == 2 for r in results)
    for r in results:
        assert r.shard_id == shard_for(r.id, 2)
        assert {cid.split("#")[0] for cid in flow.shards[r.shard_id].chunks} >= {r.id}
    # every chunk was embedded with its document's title in front
    assert any(text.startswith("bees: Honeybees") for text in flow.embedder.embedded[0])
    stored = flow.shards[shard_for("bees", 2)].writes[0]
    assert stored[0].metadata["format"] == "txt" and stored[0].text.startswith("Honeybees")
    again, _, _ = await flow.ingest(("bees", BEES))
    assert again[0].replaced_chunks == 2 and timings.total_ms > 0
    assert sequences == {}  # standalone shards: no log, no sequences


async def test_a_bad_document_refuses_the_whole_batch_before_anything_is_written():
    flow = Flow()
    docs = [DocumentInput(id="ok", source="ok.txt", body=BEES), DocumentInput(id="bad", source="bad.txt", body="   ")]
    with pytest.raises(InvalidArgument, match="bad.txt"):
        await flow.rag.ingest(docs, Deadline(10))
    assert not any(s.writes for s in flow.shards)


async def test_search_finds_the_passage_and_says_which_shards_answered():
    flow = Flow()
    await flow.ingest(("bees", BEES), ("bread", BREAD), ("lamps", LAMPS))
    for mode in ("dense", "lexical", "hybrid"):
        hits, coverage, _ = await flow.rag.search(SearchQuery("wild yeast sourdough starter", top_k=2, mode=mode),
                                                  Deadline(10))
        assert hits[0].document_id == "bread", mode
        assert coverage.answered == [0, 1] and not coverage.partial
    hits, _, timings = await flow.rag.search(SearchQuery("waggle dance direction", top_k=1, rerank=True), Deadline(10))
    assert hits[0].document_id == "bees" and hits[0].evidence and timings.rerank_ms >= 0
    with pytest.raises(InvalidArgument, match="mode"):
        await flow.rag.search(SearchQuery("x", mode="fuzzy"), Deadline(10))
    with pytest.raises(InvalidArgument, match="top_k"):
        await flow.rag.search(SearchQuery("x", top_k=0), Deadline(10))


async def test_a_shard_down_gives_a_partial_result_unless_the_caller_requires_all():
    flow = Flow()
    await flow.ingest(("bees", BEES), ("bread", BREAD), ("lamps", LAMPS))
    down = shard_for("bread", 2)
    flow.shards[down].down = True
    hits, coverage, _ = await flow.rag.search(SearchQuery("wild yeast sourdough", mode="lexical"), Deadline(10))
    assert coverage.partial and coverage.failed == [down] and coverage.answered == [1 - down]
    assert all(h.shard_id != down for h in hits)
    with pytest.raises(Unavailable, match="did not answer"):
        await flow.rag.search(SearchQuery("wild yeast", require_complete=True), Deadline(10))
    # a partial answer is never cached
    sources, _, _ = await flow.ask("How do honeybees tell each other where flowers are?")
    assert sources.coverage.partial
    sources, _, _ = await flow.ask("How do honeybees tell each other where flowers are?")
    assert not sources.cached and len(flow.generator.requests) == 2


async def test_ask_streams_sources_then_the_answer_then_citations_and_is_cached_until_a_write():
    flow = Flow()
    await flow.ingest(("bees", BEES), ("bread", BREAD), ("lamps", LAMPS))
    sources, text, done = await flow.ask("How do honeybees tell each other where flowers are?")
    assert sources.sources[0][1].document_id == "bees" and not sources.cached
    assert text.startswith("Bees dance") and not done.abstained and done.completion_tokens == 1
    prompt = flow.generator.requests[0]["messages"][-1]["content"]
    assert "waggle dance" in prompt and "Sourdough" not in prompt
    # the same question again: replayed from the cache, no generation, no query embedding
    embedded = len(flow.embedder.embedded)
    sources, again, _ = await flow.ask("  How do honeybees tell each other where flowers are?  ")
    assert sources.cached and again == text and len(flow.generator.requests) == 1
    assert len(flow.embedder.embedded) == embedded
    # the same question with the cache refused is answered afresh
    sources, _, _ = await flow.ask("How do honeybees tell each other where flowers are?", use_cache=False)
    assert not sources.cached and len(flow.generator.requests) == 2
    # a write to the tenant invalidates its answers
    await flow.ingest(("lamps", LAMPS))
    sources, _, _ = await flow.ask("How do honeybees tell each other where flowers are?")
    assert not sources.cached and len(flow.generator.requests) == 3


async def test_tenants_do_not_share_cached_answers():
    flow = Flow()
    await flow.ingest(("bees", BEES), ("bread", BREAD))
    await flow.ingest(("bees", BEES), tenant="acme")
    await flow.ask("How do honeybees tell each other where flowers are?")
    sources, _, _ = await flow.ask("How do honeybees tell each other where flowers are?", scope=Scope("acme"))
    assert not sources.cached and len(flow.generator.requests) == 2


async def test_a_tenants_query_embedding_is_cached_for_it_alone():
    """A cache hit is faster than a miss: shared entries would tell one tenant what another searched."""
    flow = Flow()
    await flow.ingest(("bees", BEES))
    await flow.ingest(("bees", BEES), tenant="acme")
    calls = len(flow.embedder.embedded)
    for tenant in ("", "acme", "", "acme"):
        await flow.rag.search(SearchQuery("waggle dance", scope=Scope(tenant), mode="dense"), Deadline(10))
    assert len(flow.embedder.embedded) - calls == 2, "one miss per tenant, then hits"


async def test_over_long_questions_and_oversized_ingests_are_refused_before_any_model_work():
    flow = Flow(max_question_tokens=20, max_chunks_per_request=3)
    await flow.ingest(("bees", BEES))
    calls = len(flow.embedder.embedded)
    with pytest.raises(InvalidArgument, match="question: .*20 tokens"):
        [e async for e in flow.rag.ask(AskQuery("why " * 21), Deadline(10))]
    with pytest.raises(InvalidArgument, match="query"):
        await flow.rag.search(SearchQuery("bees " * 5000), Deadline(10))
    with pytest.raises(InvalidArgument, match="max-chunks-per-request"):
        await flow.ingest(("bees", BEES), ("bread", BREAD))  # 4 chunks
    assert len(flow.embedder.embedded) == calls and not flow.generator.requests
    await flow.ask("why " * 20)  # at the limit is fine


async def test_with_the_embedder_down_hybrid_answers_from_bm25_and_says_so():
    flow = Flow(verify=True, rerank_ask=True)
    await flow.ingest(("bees", BEES), ("bread", BREAD), ("lamps", LAMPS))
    flow.embedder.down = True
    hits, coverage, _ = await flow.rag.search(SearchQuery("wild yeast sourdough starter", mode="hybrid"), Deadline(10))
    assert hits[0].document_id == "bread"
    assert coverage.retrieval == "lexical" and "lexical (BM25) only" in coverage.degraded[0]
    with pytest.raises(Unavailable):  # dense alone has nothing to fall back on
        await flow.rag.search(SearchQuery("wild yeast", mode="dense"), Deadline(10))
    # an ask goes on: BM25, the retrieval order (no rerank), verification by words; the answer is kept
    sources, text, done = await flow.ask("How do honeybees tell each other where flowers are?")
    assert sources.sources[0][1].document_id == "bees" and sources.coverage.retrieval == "lexical"
    assert text and not done.abstained and flow.generator.requests
    stages = " | ".join(done.degraded)
    assert "retrieval:" in stages and "rerank:" in stages and "verification:" in stages, stages
    # a degraded answer is not cached: with the embedder back, the full pipeline answers
    flow.embedder.down = False
    sources, _, done = await flow.ask("How do honeybees tell each other where flowers are?")
    assert not sources.cached and done.degraded == [] and sources.coverage.retrieval == "hybrid"


async def test_an_answer_without_citations_is_attributed_by_words_when_the_embedder_fails():
    flow = Flow(pieces=("Sourdough is leavened by wild yeast and lactic acid bacteria.",), prompt="passages",
                rerank_ask=False)
    await flow.ingest(("bees", BEES), ("bread", BREAD))
    flow.embedder.down = True
    _, text, done = await flow.ask("What leavens sourdough?", mode="lexical")
    assert text.startswith("Sourdough") and done.citations
    assert any(d.startswith("attribution:") for d in done.degraded)


async def test_off_corpus_questions_abstain_and_an_empty_collection_is_a_failed_precondition():
    flow = Flow()
    with pytest.raises(FailedPrecondition, match="ingest documents first"):
        await flow.ask("anything?")
    await flow.ingest(("bees", BEES), ("bread", BREAD))
    _, text, done = await flow.ask("Who won the football world cup in 1998?")
    assert done.abstained and "do not answer" in text and not flow.generator.requests


async def test_ask_checks_the_request_against_its_limits_but_not_the_routers_own_defaults():
    flow = Flow()
    for query, field in [(AskQuery(" "), "question"), (AskQuery("q", top_k=51), "top_k"),
                         (AskQuery("q", max_tokens=5000), "max_tokens"), (AskQuery("q", temperature=3), "temperature")]:
        with pytest.raises(InvalidArgument, match=field):
            [e async for e in flow.rag.ask(query, Deadline(10))]
    # a default above what a request may ask for is the operator's choice, not a bad request
    flow = Flow(max_tokens=1500, ask_top_k=60)
    await flow.ingest(("bees", BEES))
    sources, _, _ = await flow.ask("How do honeybees tell each other where flowers are?")
    assert flow.generator.requests[0]["max_tokens"] == 1500


class RefusingShard(FakeShard):
    def __init__(self, shard_id, error):
        super().__init__(shard_id)
        self.error = error

    async def lexical_search(self, *args):
        raise self.error


@pytest.mark.parametrize("error, partial", [
    (FailedPrecondition("shard 1 got a request for shard 0"), True),  # misrouted: that shard is left out
    (Unavailable("shard down"), True),
    (InvalidArgument("k", "too large"), False),  # the request itself: every shard would refuse it
    (ZeroDivisionError("a bug"), False),
])
async def test_which_shard_failures_leave_the_shard_out_and_which_fail_the_request(error, partial):
    flow = Flow()
    await flow.ingest(("bees", BEES), ("bread", BREAD), ("lamps", LAMPS))
    flow.rag.rag.retriever.shards = shard_groups(flow.shards[0], RefusingShard(1, error))
    query = SearchQuery("wild yeast sourdough", mode="lexical")
    if partial:
        _, coverage, _ = await flow.rag.search(query, Deadline(10))
        assert coverage.failed == [1] and coverage.answered == [0]
    else:
        with pytest.raises(type(error)):
            await flow.rag.search(query, Deadline(10))


async def test_a_write_refused_before_it_reaches_the_shards_keeps_the_cached_answers():
    flow = Flow()
    await flow.ingest(("bees", BEES))
    generation = await flow.cache.generation("")
    with pytest.raises(InvalidArgument):
        await flow.rag.ingest([DocumentInput(id="empty", source="empty.txt", body=" ")], Deadline(10))
    with pytest.raises(InvalidArgument):
        await flow.rag.delete("", Deadline(10))
    assert await flow.cache.generation("") == generation
    flow.shards[shard_for("gone", 2)].down = True  # a write that reaches a shard and fails there does
    with pytest.raises(Unavailable):
        await flow.rag.delete("gone", Deadline(10))
    assert await flow.cache.generation("") == generation + 1


async def test_delete_removes_a_document_from_its_shard_and_invalidates_the_cache():
    flow = Flow()
    await flow.ingest(("bees", BEES), ("bread", BREAD))
    await flow.ask("How do honeybees tell each other where flowers are?")
    assert await flow.rag.delete("bees", Deadline(10)) == (2, {})
    assert not any(cid.startswith("bees#") for s in flow.shards for cid in s.chunks)
    hits, _, _ = await flow.rag.search(SearchQuery("waggle dance", mode="lexical"), Deadline(10))
    assert all(h.document_id != "bees" for h in hits)
    with pytest.raises(InvalidArgument):
        await flow.rag.delete("", Deadline(10))


async def test_this_routers_own_last_write_is_relaxed_when_no_replica_has_it_but_a_callers_token_is_not():
    flow = Flow()
    await flow.ingest(("bees", BEES), ("bread", BREAD), ("lamps", LAMPS))
    lagging = flow.shards[0]
    lagging.applied = 5
    flow.rag.rag.ingestion.written.update({0: 9, 1: 3})  # as if this router's last write to shard 0 were at 9
    stale = sample("ragloom_router_stale_reads_total", shard="0")
    _, coverage, _ = await flow.rag.search(SearchQuery("wild yeast sourdough", mode="lexical"), Deadline(10))
    assert not coverage.partial and sample("ragloom_router_stale_reads_total", shard="0") == stale + 1
    _, coverage, _ = await flow.rag.search(SearchQuery("wild yeast sourdough", mode="lexical",
                                                       min_sequences={0: 9}), Deadline(10))
    assert coverage.failed == [0]  # the caller asked to read its write: shard 0 cannot answer it yet
    lagging.applied = 9
    _, coverage, _ = await flow.rag.search(SearchQuery("wild yeast sourdough", mode="lexical",
                                                       min_sequences={0: 9}), Deadline(10))
    assert not coverage.partial


async def test_hybrid_with_the_query_embedding_cached_is_one_call_per_shard_with_the_same_hits():
    flow = Flow()
    await flow.ingest(("bees", BEES), ("bread", BREAD), ("lamps", LAMPS))
    query = SearchQuery("wild yeast sourdough starter", top_k=3, mode="hybrid")
    lookups, get = [], flow.cache.get
    flow.cache.get = lambda key: lookups.append(key) or get(key)
    first, _, _ = await flow.rag.search(query, Deadline(10))  # embeds the query: two calls per shard
    assert not any(getattr(s, "hybrid_calls", 0) for s in flow.shards)
    assert len(lookups) == 1  # the miss is looked up once, not again before embedding
    again, coverage, _ = await flow.rag.search(query, Deadline(10))
    assert [s.hybrid_calls for s in flow.shards] == [1, 1] and coverage.answered == [0, 1]
    assert [(h.chunk_id, round(h.score, 6)) for h in again] == [(h.chunk_id, round(h.score, 6)) for h in first]
