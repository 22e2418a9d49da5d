from collections import Counter

from router.prompt import Passage, build_messages, cited_numbers
from router.sharding import shard_for


def words(text: str) -> int:
    return len(text.split())


def test_sources_are_numbered_and_cut_to_the_budget():
    passages = [Passage(i, f"doc{i}.txt", "word " * 100) for i in range(1, 6)]
    messages, used = build_messages("Why?", passages, words, budget_tokens=260)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "[1] word" in user and "Question: Why?" in user
    assert 1 <= len(used) < 5 and [p.number for p in used] == list(range(1, len(used) + 1))
    assert words(messages[0]["content"]) + words(user) <= 260


def test_citations_in_order_of_first_mention_within_range():
    assert cited_numbers("Bees dance [2]. Also [1, 2] and [7] and [2].", valid=3) == [2, 1]
    assert cited_numbers("No markers here.", valid=3) == []


def test_shard_hash_is_stable_and_spreads():
    assert shard_for("doc-42", 2) == shard_for("doc-42", 2)
    assert shard_for("/data/a.txt", 4) == 1  # fixed by the hash; changing it would move every document
    counts = Counter(shard_for(f"document-{i}", 4) for i in range(4000))
    assert min(counts.values()) > 850
