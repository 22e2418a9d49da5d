"""The labelled sets' unanswerable questions really are unanswerable from the document they are about."""

import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "bench" / "data"


def _near_misses(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("q", _near_misses(DATA / "retrieval" / "unanswerable.json"), ids=lambda q: q["id"])
def test_a_prose_near_miss_is_not_answered_by_its_document(q):
    text = (DATA / "retrieval" / "docs" / q["about"]).read_text()
    assert not re.search(q["absent"], text, re.I), f"{q['about']} holds /{q['absent']}/: {q['question']}"


def test_every_near_miss_is_about_a_document_of_its_set():
    prose = {p.name for p in (DATA / "retrieval" / "docs").iterdir()}
    pages = set((DATA / "answers" / "documents.txt").read_text().split())
    for path, documents in [(DATA / "retrieval" / "unanswerable.json", prose),
                            (DATA / "answers" / "near_misses.json", pages)]:
        questions = _near_misses(path)
        assert len({q["id"] for q in questions}) == len(questions) == 40
        assert {q["about"] for q in questions} <= documents
        assert all(q["question"].endswith("?") and q["absent"] for q in questions)
