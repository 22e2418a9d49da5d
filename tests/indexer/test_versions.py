"""The newer version wins, whatever the order writes arrive in: what makes replaying the shard's log harmless."""

from __future__ import annotations

import random
import sqlite3

import numpy as np
import pytest

from indexer.filters import SearchFilter
from indexer.store import DB_FILE, ChunkRecord, ShardStore
from fabric.errors import InvalidArgument

DIM = 8


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


VECTORS = unit_vectors(32)


def chunks(document_id: str, ids: range, text: str = "", tenant: str = "") -> list[ChunkRecord]:
    return [
        ChunkRecord(f"{document_id}#{i}", document_id, VECTORS[i], text=text or f"{document_id}#{i}", tenant=tenant)
        for i in ids
    ]


def state(store: ShardStore) -> set[tuple]:
    """What a reader can see: every live chunk of the tenants used here with its text, through search."""
    seen = set()
    for tenant in ("", "T"):
        [hits] = store.search(VECTORS[:1], k=1000, where=SearchFilter(tenant=tenant))
        seen |= {(h.tenant, h.chunk_id, h.document_id, h.text) for h in hits}
    return seen


@pytest.fixture
def open_store(tmp_path):
    opened = []

    def open_(name: str = "a") -> ShardStore:
        store = ShardStore(tmp_path / name, DIM, initial_capacity=8)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def test_an_older_write_after_a_newer_one_is_a_no_op(open_store):
    store = open_store()
    store.upsert(chunks("doc", range(2), "new"), version=200)

    result = store.upsert(chunks("doc", range(2), "old"), version=100)

    assert (result.written, result.skipped) == (0, 2)
    assert {text for *_, text in state(store)} == {"new"}
    assert store.max_version == 200


def test_reapplying_a_write_is_idempotent(open_store):
    store = open_store()
    first = store.upsert(chunks("doc", range(3)), replace_documents=True, version=5)
    again = store.upsert(chunks("doc", range(3)), replace_documents=True, version=5)

    assert (first.written, again.written, again.skipped, again.removed) == (3, 0, 3, 0)
    assert store.stats().live_chunks == 3


def test_a_late_older_write_does_not_resurrect_a_deleted_document(open_store):
    store = open_store()
    store.delete(["doc"], version=300)  # arrives first, though issued last

    result = store.upsert(chunks("doc", range(2)), version=200)

    assert result.skipped == 2
    assert state(store) == set()
    assert store.upsert(chunks("doc", range(1)), version=301).written == 1  # a newer write does land


def test_a_delete_keeps_chunks_written_after_it(open_store):
    store = open_store()
    store.upsert(chunks("doc", range(2)), version=100)
    store.upsert(chunks("doc", range(2, 3)), version=300)

    result = store.delete(["doc"], version=200)

    assert result.removed == 2
    assert {chunk_id for _, chunk_id, *_ in state(store)} == {"doc#2"}


def test_unversioned_writes_always_win_over_what_is_there(open_store):
    store = open_store()
    store.upsert(chunks("doc", range(1), "router"), version=2**62)

    result = store.upsert(chunks("doc", range(1), "local"))

    assert result.written == 1 and result.version == 2**62 + 1
    assert {text for *_, text in state(store)} == {"local"}


def test_version_zero_is_refused(open_store):
    with pytest.raises(InvalidArgument) as error:
        open_store().upsert(chunks("doc", range(1)), version=0)
    assert error.value.field == "version"


# Writes to one shard issued in this order; every replica receives some subset in some order.
WRITES = [
    ("upsert", "a", range(0, 4), 10, False, ""),
    ("upsert", "b", range(4, 8), 11, False, ""),
    ("upsert", "a", range(0, 2), 12, True, ""),  # document a replaced by two chunks
    ("delete", "b", None, 13, False, ""),
    ("upsert", "b", range(8, 9), 14, True, ""),
    ("upsert", "a", range(0, 3), 15, False, "T"),  # another tenant, same ids
    ("delete", "a", None, 16, False, "T"),
    ("upsert", "x", range(12, 14), 16, False, "T"),
    ("upsert", "c", range(9, 12), 17, False, ""),
]


def apply(store: ShardStore, write) -> None:
    kind, document_id, ids, version, replace, tenant = write
    if kind == "upsert":
        store.upsert(chunks(document_id, ids, f"v{version}", tenant), replace_documents=replace, version=version)
    else:
        store.delete([document_id], tenant=tenant, version=version)


def test_any_order_of_the_same_writes_ends_in_the_same_state(open_store):
    reference = open_store("reference")
    for write in WRITES:
        apply(reference, write)
    expected = state(reference)
    assert expected  # the scenario leaves something to compare

    rng = random.Random(0)
    for n in range(40):
        order = rng.sample(range(len(WRITES)), len(WRITES))
        store = open_store(f"order{n}")
        for i in order:
            apply(store, WRITES[i])
        assert state(store) == expected, order
