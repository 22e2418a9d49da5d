"""The Rerank RPC on a real embedder: a passage that answers ranks above one that only shares its words."""

import asyncio

import grpc
import pytest

from embedder.server import Settings, create_service
from fabric.server import serve
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc

# (question, title, a passage that answers it, one that shares its words but does not answer)
CASES = [
    ("Which signal makes a running dd report how far it has got?", "dd",
     "Sending a USR1 signal to a running 'dd' process makes it print I/O statistics to standard error "
     "and then resume copying.",
     "dd copies a file, converting and formatting according to the operands; a running dd reads the input "
     "one block at a time and reports errors on standard error."),
    ("When was the Rosetta Stone found?", "rosetta stone",
     "French soldiers digging fortifications near the town of Rashid discovered the stone in July 1799.",
     "The Rosetta Stone is a granodiorite stele; the stone is found on many lists of famous objects and "
     "its text was found to be a decree."),
]
OFF_TOPIC = "A lighthouse keeper trimmed the wick and wound the clockwork that turned the lens every night."


@pytest.fixture(scope="module")
def served():
    loop = asyncio.new_event_loop()
    settings = Settings(port=0, max_rerank_texts=4)  # the default model
    stop = asyncio.Event()
    ready = loop.create_future()
    task = loop.create_task(serve(create_service(settings), settings, on_ready=ready.set_result, stop=stop))
    port = loop.run_until_complete(asyncio.wait_for(ready, 60))
    yield loop, port
    stop.set()
    loop.run_until_complete(task)
    loop.close()


def _call(served, request, timeout=20):
    loop, port = served

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await embedder_pb2_grpc.EmbedderServiceStub(channel).Rerank(request, timeout=timeout)

    return loop.run_until_complete(go())


@pytest.mark.parametrize("question, title, answers, shares_words", CASES)
def test_the_answering_passage_ranks_above_one_that_only_shares_words(served, question, title, answers, shares_words):
    texts = [shares_words, OFF_TOPIC, answers]
    reply = _call(served, embedder_pb2.RerankRequest(query=question, texts=texts, titles=[title, "lighthouses", title]))
    assert [r.index for r in reply.results] == [2, 0, 1]
    assert reply.results[0].score > reply.results[1].score > reply.results[2].score
    assert all(r.spans for r in reply.results) and reply.model.endswith("sentence-rerank")
    for r in reply.results:  # spans come best first, inside their text
        assert [sp.score for sp in r.spans] == sorted((sp.score for sp in r.spans), reverse=True)
        assert all(0 <= sp.start < sp.end <= len(texts[r.index]) for sp in r.spans)


def test_the_best_sentence_is_the_one_that_answers(served):
    text = ("shred overwrites the specified files repeatedly. It can also remove them afterwards. "
            "By default, it makes three passes over the data; use -n to change the number of passes.")
    reply = _call(served, embedder_pb2.RerankRequest(query="How many overwriting passes does shred do unless told?",
                                                     texts=[text], titles=["shred"], spans_per_text=1))
    span = reply.results[0].spans[0]
    assert len(reply.results[0].spans) == 1
    # the answering sentence, alone or with the one before it (a neighbouring pair), never the opening one
    best = text[span.start:span.end]
    assert "By default, it makes three passes" in best and "specified files" not in best, best


def test_relevance_is_the_score_without_the_bonus_for_holding_what_is_asked(served):
    # "How long" asks for a duration: a sentence with a number gains the answer-type bonus, which ranks
    # it among sentences about the question but says nothing of whether it is about the question.
    texts = ["The zero number of seconds is interpreted as --nonblock.",
             "Soft-boiled eggs are simmered for about six minutes, then cooled in cold water."]
    reply = _call(served, embedder_pb2.RerankRequest(query="How long should a soft-boiled egg be cooked?",
                                                     texts=texts, titles=["flock 1", "breakfast"]))
    by_index = {r.index: r for r in reply.results}
    assert all(r.HasField("relevance") for r in reply.results)
    off, on = by_index[0], by_index[1]
    assert off.score - off.relevance > 0.2  # the number lifted the score, not the relevance
    assert on.relevance > off.relevance + 0.2 and reply.results[0].index == 1


def test_a_scorer_without_an_answer_type_bonus_leaves_relevance_unset(monkeypatch, served):
    import embedder.rerank

    async def plain(query, texts, embed, weights=None, spans_per_text=3, titles=()):
        return [embedder.rerank.Ranked(i, 1.0 - i / 10, []) for i in range(len(texts))]

    monkeypatch.setattr(embedder.rerank, "rerank", plain)
    reply = _call(served, embedder_pb2.RerankRequest(query="bees", texts=["one text", "another"]))
    assert [r.index for r in reply.results] == [0, 1]
    assert not any(r.HasField("relevance") for r in reply.results)  # the router then reads the score


@pytest.mark.parametrize("request_kwargs, field", [
    (dict(query="bees", texts=[]), "texts"),
    (dict(query="bees", texts=["a", "b", "c", "d", "e"]), "texts"),
    (dict(query="  ", texts=["a text"]), "query"),
    (dict(query="bees", texts=["a text", " "]), "texts[1]"),
    (dict(query="bees", texts=["a text"], spans_per_text=17), "spans_per_text"),
    (dict(query="bees", texts=["a text", "another"], titles=["one title"]), "titles"),
])
def test_bad_input_is_invalid_argument_naming_the_field(served, request_kwargs, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _call(served, embedder_pb2.RerankRequest(**request_kwargs))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field + ":")
