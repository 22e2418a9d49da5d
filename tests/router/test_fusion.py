from router.domain import Coverage, Hit
from router.retrieval import fuse_reciprocal_rank


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
