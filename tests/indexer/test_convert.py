"""The shard's responses assembled from memoised hit encodings are exactly what protobuf itself builds."""

from __future__ import annotations

import struct

import numpy as np

from indexer import convert
from indexer.records import HitRecord, Payload
from ragloom.indexer.v1 import indexer_pb2


def payload(i: int, **fields) -> Payload:
    values = dict(tenant="", chunk_id=f"c{i}", document_id=f"d{i}", text=f"text {i}", source="s", metadata={}, tags=())
    values.update(fields)
    return Payload(**values)


def by_protobuf(results, shard_id: int, lexical=()) -> indexer_pb2.SearchResponse:
    """The response built field by field through protobuf's own API (what the shard did before)."""
    def result(hits):
        return indexer_pb2.QueryResult(hits=[
            indexer_pb2.Hit(chunk_id=h.chunk_id, document_id=h.document_id, score=h.score, text=h.text,
                            source=h.source, metadata=h.metadata, tenant=h.tenant, tags=h.tags) for h in hits])
    return indexer_pb2.SearchResponse(results=[result(r) for r in results], shard_id=shard_id,
                                      lexical_results=[result(r) for r in lexical])


def test_the_assembled_response_equals_protobufs_own():
    odd = payload(7, tenant="acme", text="naïve — 日本語 " * 300, source="man/ls.1",  # a long text: 2-byte lengths
                  metadata={"section": "1", "": "empty key"}, tags=("a", "b"))
    results = [
        [HitRecord(payload(1), 0.9), HitRecord(odd, -0.25), HitRecord(payload(2), 0.0)],
        [],  # a query with no hits keeps its place
        [HitRecord(odd, float(np.float32(1 - np.float32(0.123))))],
    ]
    lexical = [[HitRecord(payload(3), 12.5)]]
    for shard_id in (0, 3, 300):  # 0 is left out on the wire, 300 takes two varint bytes
        assert convert.search_response(results, shard_id, lexical) == by_protobuf(results, shard_id, lexical)
        assert convert.search_response(results, shard_id) == by_protobuf(results, shard_id)
    assert convert.search_response([], 0) == indexer_pb2.SearchResponse()


def test_a_chunk_is_encoded_once_and_its_memo_serves_every_score():
    shared = payload(1, metadata={"k": "v"}, tags=("t",))
    first = convert.search_response([[HitRecord(shared, 0.5)]], 1)
    memo = shared.wire
    assert memo is not None
    second = convert.search_response([[HitRecord(shared, 0.25)], [HitRecord(shared, 0.75)]], 1)
    assert shared.wire is memo  # not encoded again
    assert [h.score for h in first.results[0].hits] == [0.5]
    assert [[h.score for h in r.hits] for r in second.results] == [[0.25], [0.75]]
    assert second.results[1].hits[0].metadata == {"k": "v"} and list(second.results[1].hits[0].tags) == ["t"]


def test_scores_round_to_float32_as_protobuf_rounds_them():
    scores = [1 / 3, 0.1, -1e-8, 0.9999999999]
    response = convert.search_response([[HitRecord(payload(i), s) for i, s in enumerate(scores)]], 0)
    assert [h.score for h in response.results[0].hits] == [struct.unpack("<f", struct.pack("<f", s))[0] for s in scores]


def test_a_hit_reads_through_its_payload_and_hands_out_copies():
    shared = payload(1, metadata={"k": "v"}, tags=("t",))
    hit = HitRecord(shared, 0.5)
    hit.metadata["k"] = "changed"
    hit.tags.append("more")
    assert (hit.chunk_id, hit.document_id, hit.text, hit.source, hit.tenant) == ("c1", "d1", "text 1", "s", "")
    assert hit.metadata == {"k": "v"} and hit.tags == ["t"]
    assert hit == HitRecord(payload(1, metadata={"k": "v"}, tags=("t",)), 0.5)
    assert hit != HitRecord(shared, 0.25)
