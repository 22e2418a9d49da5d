from router.evidence import EvidenceConfig, Scored, Span, combine, grounded_messages, quote, select


def count(text):
    return len(text.split())


def test_combine_adds_the_retrieval_prior_and_sorts():
    ranked = combine([Scored(0, 0.50), Scored(1, 0.58), Scored(2, 0.40)], prior_weight=0.1)
    assert [r.index for r in ranked] == [1, 0, 2]
    assert abs(ranked[1].score - 0.60) < 1e-9  # 0.50 + 0.1 / 1
    assert [r.index for r in combine([Scored(0, 0.50), Scored(1, 0.52)], 0.1)] == [0, 1]


def test_select_takes_the_best_sentences_within_the_budget_in_reading_order():
    first = "Alpha one two. Beta three four five. Gamma six."
    spans = (Span(15, 36, 0.9), Span(0, 14, 0.7), Span(37, 47, 0.2))
    second = "Delta seven eight."
    chosen = select([(1, first, spans), (2, second, (Span(0, 18, 0.75),))],
                    EvidenceConfig(sentences=3, tokens=20, sources=2, max_gap=0.3), count)
    # Gamma is too far below the best; the rest come in reading order per source, best source first.
    assert [s.text for s in chosen] == ["Alpha one two.", "Beta three four five.", "Delta seven eight."]
    tight = select([(1, first, spans)], EvidenceConfig(sentences=3, tokens=4, max_gap=1), count)
    assert [s.text for s in tight] == ["Beta three four five."]  # the first always fits; nothing more does


def test_the_prompt_numbers_evidence_by_source_and_the_quote_cites_it():
    chosen = select([(3, "Bees dance. They fly.", (Span(0, 11, 0.9), Span(12, 21, 0.8)))], EvidenceConfig(), count)
    messages = grounded_messages("How do bees talk?", chosen)
    assert messages[0]["role"] == "system" and "[3] Bees dance.\n[3] They fly." in messages[1]["content"]
    assert messages[1]["content"].endswith("Question: How do bees talk?")
    assert quote(chosen) == "“Bees dance.” [3] “They fly.” [3]"
    assert quote(chosen, limit=1) == "“Bees dance.” [3]"
