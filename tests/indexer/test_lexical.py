"""BM25 beside the vectors: in step with upserts and deletes, durable, filtered like dense search."""

import numpy as np
import pytest

from indexer.filters import SearchFilter
from indexer.lexical import match_expression
from indexer.store import ChunkRecord, ShardStore

DIM = 8


def chunk(chunk_id, document_id, text, tenant="", tags=()):
    vector = np.random.default_rng(abs(hash(chunk_id)) % 2**32).normal(size=DIM).astype(np.float32)
    return ChunkRecord(chunk_id, document_id, vector, text=text, source=f"{document_id}.txt", tenant=tenant, tags=list(tags))


@pytest.fixture
def store(tmp_path):
    s = ShardStore(tmp_path, DIM)
    yield s
    s.close()


def ids(results):
    return [[h.chunk_id for h in hits] for hits in results]


def test_bm25_ranks_rare_terms_and_stems(store):
    store.upsert([
        chunk("a#0", "a", "The congestion window doubles during slow start."),
        chunk("b#0", "b", "Bees dance to tell the hive where flowers are."),
        chunk("c#0", "c", "A window seat on a slow train."),
    ])
    results = store.lexical_search(["congestion windows", "dancing bees"], k=2)
    assert ids(results)[0][0] == "a#0" and ids(results)[1] == ["b#0"]
    assert results[0][0].score > 0


def test_kept_in_step_with_replace_and_delete_and_durable(tmp_path):
    store = ShardStore(tmp_path, DIM)
    store.upsert([chunk("a#0", "a", "porcelain kiln at Meissen")])
    store.upsert([chunk("a#0", "a", "glassworks on Murano island")], replace_documents=True)
    assert ids(store.lexical_search(["Meissen porcelain"], k=5)) == [[]]
    assert ids(store.lexical_search(["Murano"], k=5)) == [["a#0"]]
    store.close()
    reopened = ShardStore(tmp_path, DIM)
    assert ids(reopened.lexical_search(["Murano"], k=5)) == [["a#0"]]
    reopened.delete(["a"])
    assert ids(reopened.lexical_search(["Murano"], k=5)) == [[]]
    reopened.close()


def test_tenant_and_tag_filters_hold(store):
    store.upsert([chunk("x#0", "x", "secret merger of Globex", tenant="globex", tags=["confidential"])])
    store.upsert([chunk("y#0", "y", "public note about Globex", tenant="acme", tags=["public"])])
    assert ids(store.lexical_search(["Globex merger"], k=5, where=SearchFilter(tenant="acme"))) == [["y#0"]]
    assert ids(store.lexical_search(["Globex"], k=5, where=SearchFilter(tenant="acme", tags=frozenset({"confidential"})))) == [[]]
    assert ids(store.lexical_search(["Globex"], k=5, where=SearchFilter(tenant="globex"))) == [["x#0"]]


def test_query_words_are_never_fts_syntax():
    assert match_expression('the "NEAR( OR* AND -x') == '"near" OR "x"'
    assert match_expression("the of and") is None
