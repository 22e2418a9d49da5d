"""Last writer wins by version, and replicas that exchange changes converge, whatever the order."""

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


def pull(into: ShardStore, source: ShardStore, peer: str = "peer", limit: int = 3) -> int:
    """What the catch-up does over gRPC, in-process: page through `source`'s changes after the cursor."""
    store_id, since = into.peer_cursor(peer)
    since = since if store_id == source.store_id else 0
    changed = 0
    while True:
        page = source.changes(since_sequence=since, limit=limit)
        changed += into.apply_changes(page, peer)
        since = page.sequence
        if page.done:
            return changed


def test_replicas_that_missed_different_writes_converge_by_pulling_from_each_other(open_store):
    a, b = open_store("a"), open_store("b")
    for i, write in enumerate(WRITES):
        for replica in ((a,), (b,), (a, b))[i % 3]:  # each replica misses a third of the writes
            apply(replica, write)

    pull(a, b)
    pull(b, a)

    assert state(a) == state(b)
    reference = open_store("reference")
    for write in WRITES:
        apply(reference, write)
    assert state(a) == state(reference)
    assert pull(a, b) == 0 and pull(b, a) == 0  # nothing left: echoes are no-ops


def test_pulling_resumes_after_the_cursor_and_sees_late_old_writes(open_store):
    a, b = open_store("a"), open_store("b")
    apply(b, WRITES[0])
    pull(a, b)
    _, cursor = a.peer_cursor("peer")
    assert cursor == b.sequence

    # A write with an old version reaches b only now (a router retry, say), after a newer one.
    b.upsert(chunks("z", range(20, 22)), version=50)
    b.upsert(chunks("y", range(22, 23)), version=5)

    assert pull(a, b) == 3
    assert {c for _, c, *_ in state(a)} >= {"z#20", "z#21", "y#22"}


def test_a_recreated_peer_store_is_pulled_from_the_start(open_store, tmp_path):
    a, b = open_store("a"), open_store("b")
    apply(b, WRITES[0])
    pull(a, b)
    b.close()
    (tmp_path / "b" / DB_FILE).unlink()
    fresh = open_store("b")
    apply(fresh, WRITES[-1])

    pull(a, fresh)

    assert a.peer_cursor("peer") == (fresh.store_id, fresh.sequence)
    assert {c for _, c, *_ in state(a)} >= {"c#9", "a#0"}


def test_changes_since_a_version(open_store):
    store = open_store()
    for write in WRITES[:5]:
        apply(store, write)

    page = store.changes(since_version=12, limit=1000)

    assert page.done
    assert {(c.document_id, v) for c, v in page.chunks} == {("b", 14)}
    assert {(c.document_id, c.version) for c in page.cleared} == {("b", 14)}  # b's mark moved from 13 to 14


LEGACY_LAYOUTS = {
    # The first layout: no tenants, tags, versions or per-row sequence numbers.
    "first": """CREATE TABLE chunks (label INTEGER PRIMARY KEY AUTOINCREMENT, chunk_id TEXT NOT NULL UNIQUE,
                   document_id TEXT NOT NULL, text TEXT NOT NULL, source TEXT NOT NULL, metadata TEXT NOT NULL,
                   vector BLOB NOT NULL);
                CREATE INDEX chunks_by_document ON chunks (document_id);""",
    # Tenants and versions, vectors still inside `chunks`.
    "vectors inline": """CREATE TABLE chunks (label INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,
                   chunk_id TEXT NOT NULL, document_id TEXT NOT NULL, text TEXT NOT NULL, source TEXT NOT NULL,
                   metadata TEXT NOT NULL, tags TEXT NOT NULL DEFAULT '[]', vector BLOB NOT NULL,
                   version INTEGER NOT NULL DEFAULT 1, seq INTEGER NOT NULL DEFAULT 7, UNIQUE (tenant, chunk_id));
                CREATE INDEX chunks_by_tenant_document ON chunks (tenant, document_id);
                CREATE INDEX chunks_by_seq ON chunks (seq);""",
}


@pytest.mark.parametrize("layout", LEGACY_LAYOUTS)
def test_an_earlier_layout_is_upgraded_in_place(tmp_path, layout):
    """A shard written by an earlier version opens with its chunks, their vectors and its label counter."""
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT INTO meta VALUES ('dimension', 8), ('sequence', 7);" + LEGACY_LAYOUTS[layout]
        )
        tenant = ", tenant" if layout != "first" else ""
        db.executemany(
            f"INSERT INTO chunks (chunk_id, document_id, text, source, metadata, vector{tenant})"
            f" VALUES (?, ?, ?, '', '{{}}', ?{', ?' if tenant else ''})",
            [(f"old#{i}", "old", f"text {i}", VECTORS[i].tobytes(), *([""] if tenant else [])) for i in range(5)],
        )
        db.execute("DELETE FROM chunks WHERE label > 3")  # labels 4 and 5 are gone, never to be reused

    store = ShardStore(tmp_path, DIM)
    try:
        assert store.sequence == 7
        assert {(t, c) for t, c, *_ in state(store)} == {("", "old#0"), ("", "old#1"), ("", "old#2")}
        [hits] = store.search(VECTORS[1:2], k=1)
        assert hits[0].chunk_id == "old#1" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        store.upsert(chunks("new", range(10, 11)))
        labels = {row[0] for row in store._db.execute("SELECT label FROM chunks")}
        assert labels == {1, 2, 3, 6}
        assert store.delete(["old"]).removed == 3
    finally:
        store.close()
