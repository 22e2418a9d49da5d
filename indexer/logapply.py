"""Applying the shard's log to the store: each entry a document written whole or deleted, in stream
order, inside the caller's transaction (ShardStore.apply_log records the applied sequence in it).

The stream sequence is the write's version, so the last-writer-wins rules of indexer/writes.py make a
replay harmless: an entry applied twice, or one older than what a document holds, changes nothing.

A document too big for one message comes as parts before its entry. Parts are staged in SQLite (in
the same transactions), and the document is applied from them only when its entry arrives, so no
reader ever sees half of it; its entry clears every staged part of the document.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from indexer import writes
from indexer.records import ChunkRecord, ClearedDocument, validate_chunks


@dataclass(frozen=True)
class LogPut:
    """A document's chunks (all of them, or none when `parts` staged ones make it up)."""

    sequence: int
    tenant: str
    document_id: str
    content_hash: str
    chunks: Sequence[ChunkRecord] = ()
    parts: int = 0


@dataclass(frozen=True)
class LogPart:
    """One part of a document too big for one message."""

    sequence: int
    tenant: str
    document_id: str
    content_hash: str
    part: int
    chunks: Sequence[ChunkRecord] = ()


@dataclass(frozen=True)
class LogDelete:
    sequence: int
    tenant: str
    document_id: str


LogRecord = LogPut | LogPart | LogDelete


@dataclass
class Applied:
    """What one entry changed, to mirror into the index once committed, in order."""

    removed: list[writes.Row] = field(default_factory=list)
    written: writes.Written = field(default_factory=writes.Written)

    @property
    def changed(self) -> int:
        return len(self.removed) + len(self.written.added) + len(self.written.updated)


class IncompleteDocument(Exception):
    """A document's entry arrived without all of its parts staged: the log is not what it should be."""


def apply(db: sqlite3.Connection, record: LogRecord, sequence: int, dimension: int) -> Applied:
    """One entry, in the caller's transaction; `sequence` is the store's own (snapshots, tombstones)."""
    if isinstance(record, LogPart):
        _stage(db, record, validate_chunks(record.chunks, dimension, one_tenant=True))
        return Applied()
    version = record.sequence
    if isinstance(record, LogDelete):
        removed, _ = writes.clear(db, [ClearedDocument(record.tenant, record.document_id, version)], sequence, keep=set())
        db.execute("DELETE FROM staged_parts WHERE tenant = ? AND document_id = ?", (record.tenant, record.document_id))
        return Applied(removed)
    chunks = record.chunks
    if record.parts:
        chunks, staged = _staged(db, record)
        if staged != record.parts:
            raise IncompleteDocument(f"document {record.document_id!r} (tenant {record.tenant!r}) has "
                                     f"{staged} of its {record.parts} parts at log sequence {record.sequence}")
    db.execute("DELETE FROM staged_parts WHERE tenant = ? AND document_id = ?", (record.tenant, record.document_id))
    vectors = validate_chunks(chunks, dimension, one_tenant=True)
    keep = {(c.tenant, c.chunk_id) for c in chunks}
    removed, _ = writes.clear(db, [ClearedDocument(record.tenant, record.document_id, version)], sequence, keep=keep)
    written = writes.put(db, [(c, vectors[i], version) for i, c in enumerate(chunks)], sequence)
    return Applied(removed, written)


def _stage(db: sqlite3.Connection, part: LogPart, vectors: np.ndarray) -> None:
    db.executemany(
        """INSERT OR REPLACE INTO staged_parts
           (tenant, document_id, content_hash, part, chunk_id, text, source, metadata, tags, vector)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        [(part.tenant, part.document_id, part.content_hash, part.part, c.chunk_id, c.text, c.source,
          json.dumps(c.metadata), json.dumps(list(c.tags)), vectors[i].tobytes())
         for i, c in enumerate(part.chunks)],
    )


def _staged(db: sqlite3.Connection, put: LogPut) -> tuple[list[ChunkRecord], int]:
    rows = db.execute(
        """SELECT part, chunk_id, text, source, metadata, tags, vector FROM staged_parts
           WHERE tenant = ? AND document_id = ? AND content_hash = ? ORDER BY part, rowid""",
        (put.tenant, put.document_id, put.content_hash),
    ).fetchall()
    chunks = [ChunkRecord(chunk_id=chunk_id, document_id=put.document_id, vector=np.frombuffer(vector, np.float32),
                          text=text, source=source, metadata=json.loads(metadata), tenant=put.tenant,
                          tags=tuple(json.loads(tags)))
              for _, chunk_id, text, source, metadata, tags, vector in rows]
    return chunks, len({part for part, *_ in rows})
