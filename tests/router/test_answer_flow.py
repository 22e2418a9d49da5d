"""The ask flow in process, over fake clients: reranked evidence, verified sentences, quote, abstention, cache."""

import numpy as np
import pytest

from fabric.client import Deadline
from fabric.errors import Unavailable, Unimplemented
from router.cache import Cache, MemoryBackend
from router.cached import CachedRag
from router.config import RagConfig
from router.domain import ABSTENTION, AskDone, AskQuery, AskSources, AskToken, Generated, Hit, Likelihoods
from router.evidence import Scored, Span
from router.rag import Rag
from router.reread import RereadConfig

SHRED = ("shred overwrites the specified files repeatedly. -n, --iterations=N overwrite N times instead of the "
         "default (3). -u deallocate and remove file after overwriting.")
OTHER = "watch runs a command repeatedly, displaying its output and errors; by default every 2 seconds."


class Words:
    def count(self, text):
        return len(text.split())


class FakeEmbedder:
    def __init__(self, best_score, relevance=None):
        self.best_score = best_score
        self.relevance = relevance
        self.reranked = []

    async def embed(self, texts, deadline):
        vectors = np.array([[len(t) % 7 + 1.0, 1.0, (len(t) % 3) + 0.5] for t in texts], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    async def model(self, deadline):
        return "fake"

    async def rerank(self, query, texts, deadline, titles=()):
        self.reranked.append(len(texts))
        self.titles = list(titles)
        spans = {SHRED: (Span(49, 113, 0.9), Span(0, 48, 0.8)), OTHER: (Span(0, len(OTHER), 0.3),)}
        order = sorted(range(len(texts)), key=lambda i: texts[i] != SHRED)
        return [Scored(i, self.best_score if texts[i] == SHRED else 0.2, spans[texts[i]],
                       None if self.relevance is None else (self.relevance if texts[i] == SHRED else 0.1))
                for i in order]

    async def close(self):
        pass


class FakeShards:
    """One shard whose dense and lexical searches both return OTHER first, SHRED second."""

    shard_id = 0
    replicas = (None,)  # one, as a standalone shard

    async def read(self, call, deadline):
        return await call(self)

    async def search(self, *args):
        return self._reply()

    async def lexical_search(self, *args):
        return self._reply()

    def _reply(self):
        return [Hit(0.9 - i / 10, f"d{i}", f"d{i}#0", f"{n}.1", t, 0)
                for i, (n, t) in enumerate([("watch", OTHER), ("shred", SHRED)])]

    async def close(self):
        pass


class FakeGenerator:
    """Streams `pieces`; scores (Score) with `read(context)` when given (a 10-token question), else cannot
    (UNIMPLEMENTED)."""

    def __init__(self, *pieces, read=None, fails=None):
        self.pieces = pieces
        self.requests = []
        self.read, self.fails, self.scored = read, fails, []

    async def generate(self, messages, max_tokens, stop, temperature, deadline):
        self.requests.append(messages)
        for piece in self.pieces:
            yield Generated(piece)

    async def score(self, contexts, continuation, deadline, timeout_s=None):
        if self.fails is not None:
            raise self.fails
        if self.read is None:
            raise Unimplemented("cannot score")
        self.scored.append((list(contexts), continuation))
        return Likelihoods([self.read(c) for c in contexts], 10)

    async def close(self):
        pass


def make_rag(generator, best_score=0.9, relevance=None, **config):
    embedder = FakeEmbedder(best_score, relevance)
    rag = Rag(RagConfig(**config), Words(), embedder, [FakeShards()], generator)
    return CachedRag(rag, Cache(MemoryBackend())), embedder


async def ask(rag, question="How many passes does shred make unless told otherwise?"):
    events = [e async for e in rag.ask(AskQuery(question), Deadline(10))]
    sources = next(e for e in events if isinstance(e, AskSources))
    text = "".join(e.text for e in events if isinstance(e, AskToken))
    return sources, text, events[-1]


async def test_unsupported_sentences_are_dropped_and_kept_ones_cited_by_the_router():
    generator = FakeGenerator("Shred uses a SHA-1 hash 203856749. ", "By default it overwrites", " 3 times [2].")
    rag, embedder = make_rag(generator)
    sources, text, done = await ask(rag)
    assert embedder.reranked == [2] and embedder.titles == ["watch 1", "shred 1"]
    assert sources.sources[0][1].text == SHRED and sources.sources[0][1].evidence[0] == Span(49, 113, 0.9)
    assert text == "By default it overwrites 3 times. [1]"
    assert isinstance(done, AskDone) and done.citations == [1] and not done.abstained and not done.extractive
    assert done.support[0].source == 1 and "default (3)" in done.support[0].text
    prompt = generator.requests[0][1]["content"]
    assert "[1] -n, --iterations=N overwrite N times" in prompt and "watch" not in prompt


async def test_when_nothing_is_supported_the_evidence_is_quoted():
    rag, _ = make_rag(FakeGenerator("The answer to the question is: ", "seven passes with SHA-1."))
    _, text, done = await ask(rag)
    # The two best sentences of the best source, in reading order.
    assert text == ("“shred overwrites the specified files repeatedly.” [1] "
                    "“-n, --iterations=N overwrite N times instead of the default (3).” [1]")
    assert done.extractive and done.citations == [1] and len(done.support) == 2


async def test_weak_evidence_abstains_without_generating():
    generator = FakeGenerator("never used")
    rag, _ = make_rag(generator, best_score=0.3)
    sources, text, done = await ask(rag, "Who won the 1998 football world cup?")
    assert done.abstained and text == ABSTENTION and not generator.requests and not done.citations
    assert [n for n, _ in sources.sources] == [1, 2]  # the closest passages are still listed


async def test_abstention_reads_relevance_not_the_bonus_for_holding_a_number():
    # A high score that is all answer-type bonus (it holds a number; it is not about the question) abstains.
    generator = FakeGenerator("never used")
    rag, _ = make_rag(generator, best_score=0.9, relevance=0.2)
    _, text, done = await ask(rag, "How long should a soft-boiled egg be cooked?")
    assert done.abstained and text == ABSTENTION and not generator.requests
    # The same score with the relevance to match answers.
    rag, _ = make_rag(FakeGenerator("By default it overwrites 3 times."), best_score=0.9, relevance=0.8)
    _, text, done = await ask(rag)
    assert not done.abstained and "3" in text


async def test_the_pipeline_of_today_is_one_setting_away():
    generator = FakeGenerator("Shred uses a SHA-1 hash 203856749 [1].")
    rag, embedder = make_rag(generator, rerank_ask=False, verify=False, prompt="passages")
    _, text, done = await ask(rag)
    assert text == "Shred uses a SHA-1 hash 203856749 [1]." and done.citations == [1] and not embedder.reranked
    assert "Sources:" in generator.requests[0][1]["content"]


async def test_a_cached_answer_replays_abstention_and_support():
    rag, _ = make_rag(FakeGenerator("By default it overwrites 3 times."))
    _, first, done = await ask(rag)
    _, again, replayed = await ask(rag)
    assert again == first and replayed.support == done.support and replayed.citations == done.citations
    rag, _ = make_rag(FakeGenerator("x"), best_score=0.1)
    await ask(rag, "off topic?")
    _, text, replayed = await ask(rag, "off topic?")
    assert replayed.abstained and text == ABSTENTION


@pytest.mark.parametrize("verify", [True, False])
async def test_time_to_first_token_counts_from_the_start_of_the_ask(verify):
    rag, _ = make_rag(FakeGenerator("By default it overwrites 3 times."), verify=verify)
    _, _, done = await ask(rag)
    assert 0 < done.timings.time_to_first_token_ms <= done.timings.total_ms


def _reader(likelihoods, otherwise=-8.0):
    """A reader that finds the question likeliest after the sentence it is given the highest figure for, and
    `otherwise` after anything else (a title read alone)."""
    def read(context):
        return next((lp for words, lp in likelihoods.items() if words in context), otherwise)
    return read


async def test_the_generators_reading_reorders_the_evidence_the_answer_is_built_from():
    # The reranker prefers the option line; the model finds the question likelier after the sentence before it.
    read = _reader({"-n, --iterations": -3.0, "shred overwrites the specified": -1.0, "watch runs": -4.0})
    generator = FakeGenerator("It overwrites the specified files repeatedly.", read=read)
    rag, _ = make_rag(generator)
    question = "How many passes does shred make unless told otherwise?"
    sources, _, done = await ask(rag, question)
    (contexts, continuation), = generator.scored
    # Every evidence span, each read on its own (no lift to judge: the gate is off, and nobody traces).
    assert continuation == question and len(contexts) == 3
    assert any(c.startswith("Passage: shred 1: shred overwrites") and c.endswith("Question: ") for c in contexts)
    best = sources.sources[0][1]
    assert best.text == SHRED and best.evidence[0].start == 0  # 0.8 + 0 beats 0.9 - 0.3 * 2
    assert done.timings.reread_ms > 0 and not done.degraded
    # Read strongly enough the other way, the other passage comes first.
    rag, _ = make_rag(FakeGenerator("x", read=_reader({"-n,": -6.0, "shred over": -6.0, "watch runs": -1.0})))
    sources, _, _ = await ask(rag, question)
    assert sources.sources[0][1].text == OTHER


async def test_without_a_reading_the_rerankers_order_stands():
    # A generator that cannot score (UNIMPLEMENTED) is no failure; one that fails is said, and the ask goes on.
    for generator, degraded in [(FakeGenerator("By default it overwrites 3 times."), []),
                                (FakeGenerator("By default it overwrites 3 times.", fails=Unavailable("down")),
                                 ["reread: the generator failed (UNAVAILABLE); the reranker's order"])]:
        rag, _ = make_rag(generator)
        sources, text, done = await ask(rag)
        assert sources.sources[0][1].evidence[0] == Span(49, 113, 0.9) and "3" in text
        assert done.degraded == degraded
    # Nor is anything read for a question the ask abstains on, or with re-reading off.
    for generator, config in [(FakeGenerator("x", read=lambda c: -1.0), {"best_score": 0.3}),
                              (FakeGenerator("x", read=lambda c: -1.0), {"reread": RereadConfig(sentences=0)})]:
        rag, _ = make_rag(generator, **config)
        await ask(rag)
        assert not generator.scored


async def test_evidence_that_lifts_the_question_no_more_than_its_title_abstains_without_generating():
    # The best sentence reads -1.0 a token against -1.5 for its title alone: 0.5 x 10 tokens = 5 nats of lift.
    likelihoods = {"shred overwrites the specified": -1.0, "-n, --iterations": -2.0, "watch runs": -3.0}
    generator = FakeGenerator("It overwrites the specified files repeatedly.", read=_reader(likelihoods, -1.5))
    rag, _ = make_rag(generator, reread=RereadConfig(abstain_below=5.5))
    sources, text, done = await ask(rag)
    assert done.abstained and text == ABSTENTION and not generator.requests  # nothing generated
    (contexts, _), = generator.scored  # the three sentences, then each title read alone: the baseline
    assert contexts[3:] == [f"Passage: {t}\nPlease write a question based on this passage.\nQuestion: "
                            for t in ("shred 1", "watch 1")]
    assert sources.sources[0][1].text == SHRED and sources.sources[0][1].evidence[0].start == 0  # re-read order
    assert done.timings.reread_ms > 0
    # Just above the lift, or with the gate off, the answer is built as before.
    for config in (RereadConfig(abstain_below=4.5), RereadConfig(abstain_below=None)):
        generator = FakeGenerator("It overwrites the specified files repeatedly.", read=_reader(likelihoods, -1.5))
        rag, _ = make_rag(generator, reread=config)
        _, text, done = await ask(rag)
        assert not done.abstained and generator.requests and "overwrites the specified files" in text
