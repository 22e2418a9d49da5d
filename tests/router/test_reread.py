"""Re-reading the evidence: which spans are read, and how their likelihood moves the candidates."""

from router.domain import Hit
from router.evidence import Span
from router.reread import pool, prompts, rescore


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
