"""Replication pages: the changes a peer replica pulls from this shard, and the cursors that say
how far this shard has applied each peer's.

A page holds rows (with vectors) and document marks in the order of the shard's sequence
numbers; the puller (indexer/replication.py) applies it with `ShardStore.apply_changes`,
which saves the peer's cursor in the same transaction. Kept apart from the store's other
SQL because this log is to be replaced by a NATS JetStream one.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from indexer.records import ChangePage, ChunkRecord, ClearedDocument


def start(cursor_store_id: int, since_sequence: int, store_id: int, sequence: int) -> int:
    """Where a pull with cursor (`cursor_store_id`, `since_sequence`) starts in this store's
    changes (its `store_id` and `sequence`).

    A cursor is a position in one store's sequence: another store's means nothing here, and
    one beyond this store's sequence (its folder restored from a backup) is not trusted.
    Either starts over from 0.
    """
    valid = cursor_store_id == store_id and since_sequence <= sequence
    return since_sequence if valid else 0


def page(
    db: sqlite3.Connection, since_sequence: int, since_version: int, limit: int, sequence: int, store_id: int
) -> ChangePage:
    """Rows and document marks written after `since_sequence` with a version above
    `since_version`, about `limit` of each, of a store now at `sequence`."""
    limit = max(1, limit)
    bounds = [
        row[0]
        for table in ("chunks", "cleared_documents")
        for row in db.execute(
            f"SELECT seq FROM {table} WHERE seq > ? AND version > ? ORDER BY seq LIMIT 1 OFFSET ?",
            (since_sequence, since_version, limit - 1),
        )
    ]
    upto = min(bounds, default=sequence)
    rows = db.execute(
        """SELECT tenant, chunk_id, document_id, text, source, metadata, tags, vector, version
           FROM chunks JOIN vectors USING (label)
           WHERE seq > ? AND seq <= ? AND version > ? ORDER BY seq, label""",
        (since_sequence, upto, since_version),
    )
    chunks = [
        (
            ChunkRecord(chunk_id, document_id, np.frombuffer(vector, dtype=np.float32), text, source,
                        json.loads(metadata), tenant, json.loads(tags)),
            version,
        )
        for tenant, chunk_id, document_id, text, source, metadata, tags, vector, version in rows
    ]
    cleared = [
        ClearedDocument(*row)
        for row in db.execute(
            """SELECT tenant, document_id, version FROM cleared_documents
               WHERE seq > ? AND seq <= ? AND version > ? ORDER BY seq""",
            (since_sequence, upto, since_version),
        )
    ]
    return ChangePage(chunks, cleared, max(upto, since_sequence), store_id, upto >= sequence)


def peer_cursor(db: sqlite3.Connection, peer: str) -> tuple[int, int]:
    """(store id, sequence) up to which this shard has applied `peer`'s changes; (0, 0) if never."""
    row = db.execute("SELECT store_id, sequence FROM peer_cursors WHERE peer = ?", (peer,)).fetchone()
    return row or (0, 0)


def save_peer_cursor(db: sqlite3.Connection, peer: str, store_id: int, sequence: int) -> None:
    """Remembers how far this shard has applied `peer`'s changes (in the caller's transaction)."""
    db.execute(
        "INSERT OR REPLACE INTO peer_cursors (peer, store_id, sequence) VALUES (?, ?, ?)",
        (peer, store_id, sequence),
    )
