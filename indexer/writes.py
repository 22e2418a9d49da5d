"""What a write does to SQLite (the newer version wins), and how a committed write is mirrored
into the in-memory index.

Every write carries a version: its sequence in the shard's log (or, on a standalone shard, one
stamped here: max(highest version seen + 1, wall-clock microseconds)). Rows keep the version
that wrote them, and a document deleted or replaced at version V keeps a mark "cleared at V". A
write applies only where it is newer: a chunk is written when its version is above the row's
and not below its document's mark; clearing a document at V removes its chunks older than V. So
applying the same entry twice changes nothing, which makes replaying the log harmless.

`advance`, `clear` and `put` run inside the caller's transaction (ShardStore decides where
transactions begin and end); `mirror` runs once it has committed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fabric.errors import FailedPrecondition, InvalidArgument
from indexer.filters import LabelFilters
from indexer.records import ChunkRecord, ClearedDocument
from indexer.sql import select
from indexer.vectors import VectorIndex


@dataclass(frozen=True)
class Row:
    """What the index and the filters know of a chunk."""

    label: int
    tenant: str
    source: str
    tags: tuple[str, ...]


@dataclass
class Written:
    added: list[tuple[Row, np.ndarray]] = field(default_factory=list)
    #: (row as it was, row as it is now, new vector); the label stays.
    updated: list[tuple[Row, Row, np.ndarray]] = field(default_factory=list)
    skipped: int = 0


#: The largest version a row can keep: SQLite's INTEGER is 64-bit signed (a request's is unsigned).
MAX_VERSION = 2**63 - 1


def stamp_version(given: int | None, max_version: int) -> int:
    """The version a write carries: `given`, or one newer than any seen and not behind the clock."""
    if given is None:
        if max_version >= MAX_VERSION:
            raise FailedPrecondition(f"this shard holds version {max_version}, the largest there is: only a "
                                     "write naming that version can follow")
        return max(max_version + 1, time.time_ns() // 1000)
    if not 0 < given <= MAX_VERSION:
        raise InvalidArgument("version", f"must be between 1 and {MAX_VERSION}, got {given}")
    return given


def advance(db: sqlite3.Connection, sequence: int, version: int) -> None:
    """Records the shard's new sequence number and the highest version it has seen."""
    db.execute("UPDATE meta SET value = ? WHERE key = 'sequence'", (sequence,))
    db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'max_version'", (version,))


def clear(
    db: sqlite3.Connection, marks: Iterable[ClearedDocument], sequence: int, keep: Collection[tuple[str, str]]
) -> tuple[list[Row], int]:
    """Marks documents cleared at their versions and deletes their older chunks, except `keep`
    (tenant, chunk_id) pairs, which the caller rewrites. Returns (removed rows, marks raised)."""
    removed: list[Row] = []
    raised = 0
    for mark in marks:
        raised += db.execute(
            """INSERT INTO cleared_documents (tenant, document_id, version, seq) VALUES (?, ?, ?, ?)
               ON CONFLICT (tenant, document_id) DO UPDATE SET version = excluded.version, seq = excluded.seq
               WHERE excluded.version > cleared_documents.version""",
            (mark.tenant, mark.document_id, mark.version, sequence),
        ).rowcount
        rows = db.execute(
            "SELECT label, chunk_id, source, tags FROM chunks WHERE tenant = ? AND document_id = ? AND version < ?",
            (mark.tenant, mark.document_id, mark.version),
        ).fetchall()
        removed += [
            Row(label, mark.tenant, source, tuple(json.loads(tags)))
            for label, chunk_id, source, tags in rows
            if (mark.tenant, chunk_id) not in keep
        ]
    db.executemany("DELETE FROM chunks WHERE label = ?", ((row.label,) for row in removed))
    db.executemany("DELETE FROM vectors WHERE label = ?", ((row.label,) for row in removed))
    db.executemany("INSERT INTO tombstones (label, seq) VALUES (?, ?)", ((row.label, sequence) for row in removed))
    return removed, raised


def put(db: sqlite3.Connection, items: Sequence[tuple[ChunkRecord, np.ndarray, int]], sequence: int) -> Written:
    """Writes each (chunk, vector, version) that is newer than what this shard holds."""
    written = Written()
    by_tenant: dict[str, list[tuple[ChunkRecord, np.ndarray, int]]] = {}
    for item in items:
        by_tenant.setdefault(item[0].tenant, []).append(item)
    for tenant, group in by_tenant.items():
        existing = {
            chunk_id: (label, version, Row(label, tenant, source, tuple(json.loads(tags))))
            for chunk_id, label, version, source, tags in select(
                db,
                "SELECT chunk_id, label, version, source, tags FROM chunks WHERE tenant = ? AND chunk_id IN ({})",
                [c.chunk_id for c, _, _ in group],
                tenant,
            )
        }
        cleared = dict(
            select(
                db,
                "SELECT document_id, version FROM cleared_documents WHERE tenant = ? AND document_id IN ({})",
                list(dict.fromkeys(c.document_id for c, _, _ in group)),
                tenant,
            )
        )
        fresh = [
            (c, vector, version)
            for c, vector, version in group
            if (c.chunk_id not in existing or existing[c.chunk_id][1] < version)
            and version >= cleared.get(c.document_id, 0)
        ]
        written.skipped += len(group) - len(fresh)
        db.executemany(
            """INSERT INTO chunks (tenant, chunk_id, document_id, text, source, metadata, tags, version, seq)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (tenant, chunk_id) DO UPDATE SET
                   document_id = excluded.document_id, text = excluded.text, source = excluded.source,
                   metadata = excluded.metadata, tags = excluded.tags, version = excluded.version,
                   seq = excluded.seq""",
            [
                (tenant, c.chunk_id, c.document_id, c.text, c.source, json.dumps(c.metadata),
                 json.dumps(list(c.tags)), version, sequence)
                for c, vector, version in fresh
            ],
        )
        labels = dict(
            select(
                db,
                "SELECT chunk_id, label FROM chunks WHERE tenant = ? AND chunk_id IN ({})",
                [c.chunk_id for c, _, _ in fresh],
                tenant,
            )
        )
        db.executemany(
            "INSERT OR REPLACE INTO vectors (label, vector) VALUES (?, ?)",
            [(labels[c.chunk_id], vector.tobytes()) for c, vector, _ in fresh],
        )
        for c, vector, _ in fresh:
            row = Row(labels[c.chunk_id], tenant, c.source, tuple(c.tags))
            if c.chunk_id in existing:
                written.updated.append((existing[c.chunk_id][2], row, vector))
            else:
                written.added.append((row, vector))
    return written


def mirror(index: VectorIndex, filters: LabelFilters, removed: Sequence[Row], written: Written) -> None:
    """Applies a committed write to the index and the filters."""
    index.remove([row.label for row in removed])
    for row in removed:
        filters.remove(row.label, row.tenant, row.source, row.tags)
    if written.updated:
        index.update(
            np.array([new.label for _, new, _ in written.updated], dtype=np.uint64),
            np.stack([vector for _, _, vector in written.updated]),
        )
        for old, new, _ in written.updated:
            filters.remove(old.label, old.tenant, old.source, old.tags)
            filters.add(new.label, new.tenant, new.source, new.tags)
    if written.added:
        index.add(
            np.array([row.label for row, _ in written.added], dtype=np.uint64),
            np.stack([vector for _, vector in written.added]),
        )
        for row, _ in written.added:
            filters.add(row.label, row.tenant, row.source, row.tags)
