"""Re-reading the evidence: which spans are read, and how their likelihood moves the candidates."""

import pytest

from router.domain import Hit
from router.evidence import Span
from router.reread import baselines, lift, pool, prompts, rescore
from router.server import Settings


def hit(name, text, *spans, score=None):
    best = max((s.score for s in spans), default=0.0)
    return Hit(best + 0.05 if score is None else score, name, f"{name}#0", f"{name}.txt", text, 0, evidence=spans)


BEES = hit("bees", "The cells hold brood. She performs the waggle dance.", Span(0, 21, 0.66), Span(22, 52, 0.65))
OTHER = hit("wasps", "Wasps build paper nests.", Span(0, 24, 0.5))
BARE = hit("note", "untitled", score=0.4)


def test_the_best_spans_across_candidates_are_read_each_with_its_title():
    read = pool([BEES, OTHER, BARE], 2)
    assert read == [(0, Span(0, 21, 0.66)), (0, Span(22, 52, 0.65))]
    assert prompts([BEES, OTHER], read)[1] == ("Passage: bees: She performs the waggle dance.\n"
                                               "Please write a question based on this passage.\nQuestion: ")


def test_a_sentence_read_as_likelier_takes_the_lead_within_and_across_candidates():
    hits = [BEES, OTHER, BARE]
    read = pool(hits, 3)
    out = rescore(hits, read, [-3.0, -2.0, -2.5], weight=0.3)
    bees = out[0]
    assert bees.document_id == "bees" and bees.evidence[0] == Span(22, 52, 0.65)  # 0.65 + 0 beats 0.66 - 0.3
    assert round(bees.score, 6) == round(BEES.score - 0.66 + 0.65, 6)  # the candidate moves with its best sentence
    assert [h.document_id for h in out] == ["bees", "wasps", "note"]
    # Not read: as far down as the worst-read sentence (the candidate without evidence too).
    assert round(out[2].score, 6) == round(0.4 + 0.3 * (-3.0 + 2.0), 6)
    # Strongly enough against the bees, the wasps come first; no reading, no change.
    assert rescore(hits, read, [-9.0, -9.0, -1.0], weight=0.3)[0].document_id == "wasps"
    assert rescore(hits, [], [], weight=0.3) == hits


def test_the_baseline_is_each_title_read_alone_and_the_lift_is_measured_against_it_and_the_mean():
    hits = [BEES, OTHER, BARE]
    read = pool(hits, 3)
    assert baselines(hits, read) == ["Passage: bees\nPlease write a question based on this passage.\nQuestion: ",
                                     "Passage: wasps\nPlease write a question based on this passage.\nQuestion: "]
    logprobs = [-3.0, -2.0, -2.5]
    out = rescore(hits, read, logprobs, weight=0.3)
    # The waggle-dance sentence leads: 12 tokens x (-2.0 after it - -2.6 after "bees" alone).
    assert round(lift(hits, read, logprobs, [-2.6, -2.0], 12, out[0]), 6) == round(12 * 0.6, 6)
    # The lift is of the chosen candidate's best span, against its own title.
    assert round(lift(hits, read, logprobs, [-2.6, -2.0], 12, out[1]), 6) == round(12 * -0.5, 6)
    # A candidate whose best span was not read, or one without evidence, has none.
    assert lift(hits, read[:1], logprobs[:1], [-2.6], 12, out[0]) is None
    assert lift(hits, read, logprobs, [-2.6, -2.0], 12, BARE) is None


@pytest.mark.parametrize("sentences, ok", [(0, True), (4, True), (32, True), (33, False), (-1, False)])
def test_one_score_call_holds_every_sentence_read_and_its_title(sentences, ok):
    settings = Settings(reread_sentences=sentences)
    if ok:
        settings.validate()
    else:
        with pytest.raises(ValueError, match="reread_sentences must be 0 to 32"):
            settings.validate()
