import pytest

from router.domain import Coverage, Hit
from router.retrieval import fuse_reciprocal_rank
from router.server import Settings


def hit(chunk_id: str, score: float = 0.0) -> Hit:
    return Hit(score, chunk_id.split("#")[0], chunk_id, "src", "text", 0)


def test_reciprocal_rank_fusion_rewards_agreement():
    dense = [hit("a#0"), hit("b#0"), hit("c#0")]
    lexical = [hit("c#0"), hit("d#0"), hit("a#0")]
    fused = fuse_reciprocal_rank([dense, lexical])
    assert [h.chunk_id for h in fused][:2] == ["a#0", "c#0"]  # found by both
    assert {h.chunk_id for h in fused} == {"a#0", "b#0", "c#0", "d#0"}
    assert fused[0].score == 1 / 61 + 1 / 63


def test_coverage_merge_counts_a_shard_failed_by_either_retrieval():
    merged = Coverage([0, 1], []).merge(Coverage([0], [1]))
    assert merged.answered == [0] and merged.failed == [1] and merged.partial


def test_reserved_seats_keep_each_lists_best_among_the_first_k():
    # "w" is dense's second best but BM25 never lists it; chunks both lists hold lower down outscore it.
    dense = [hit(c) for c in ("a#0", "w#0", "b#0", "c#0")]
    lexical = [hit(c) for c in ("x#0", "a#0", "b#0", "c#0", "y#0")]
    plain = [h.chunk_id for h in fuse_reciprocal_rank([dense, lexical])]
    assert plain[:5] == ["a#0", "b#0", "c#0", "x#0", "w#0"]  # fusion alone leaves it out of the first 4
    fused = [h.chunk_id for h in fuse_reciprocal_rank([dense, lexical], k=4, reserved=2)]
    assert set(fused[:4]) == {"a#0", "w#0", "x#0", "b#0"}  # both lists' best 2, then the best of the rest
    assert fused[:4] == [c for c in plain if c in fused[:4]]  # in fused order
    assert sorted(fused) == sorted(plain)  # nothing lost, nothing doubled


def test_reserved_seats_beyond_k_keep_the_fused_best_of_them():
    dense = [hit(c) for c in ("a#0", "b#0", "c#0")]
    lexical = [hit(c) for c in ("d#0", "e#0", "f#0")]
    fused = [h.chunk_id for h in fuse_reciprocal_rank([dense, lexical], k=2, reserved=3)]
    assert fused[:2] == ["a#0", "d#0"] and len(fused) == 6
    assert fuse_reciprocal_rank([dense, lexical], k=10, reserved=3) == fuse_reciprocal_rank([dense, lexical])


@pytest.mark.parametrize("candidates, reserved, ok", [(12, 3, True), (12, 6, True), (12, 7, False), (4, 0, True),
                                                      (12, -1, False)])
def test_reserved_seats_must_fit_both_methods_among_the_candidates(candidates, reserved, ok):
    settings = Settings(rerank_candidates=candidates, rerank_reserved=reserved)
    if ok:
        settings.validate()
    else:
        with pytest.raises(ValueError, match="rerank_reserved"):
            settings.validate()
