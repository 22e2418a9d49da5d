"""The shard's SQLite layout: creating it, upgrading an earlier layout in place, and the `meta`
table (dimension, sequence number, highest version seen, store id).

Both functions run inside the caller's transaction.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fabric.errors import FailedPrecondition

log = logging.getLogger(__name__)

DB_FILE = "chunks.sqlite3"

# Version given to rows written before versions existed: older than any later write.
FIRST_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
    # AUTOINCREMENT: a label is never reused, since hnswlib (or a snapshot) may still hold a deleted one.
    """CREATE TABLE IF NOT EXISTS chunks (
        label       INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant      TEXT NOT NULL,
        chunk_id    TEXT NOT NULL,
        document_id TEXT NOT NULL,
        text        TEXT NOT NULL,
        source      TEXT NOT NULL,
        metadata    TEXT NOT NULL,
        tags        TEXT NOT NULL,
        version     INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        UNIQUE (tenant, chunk_id)
    )""",
    # Vectors apart from the rows, so that looking up the payloads of hits reads small rows.
    """CREATE TABLE IF NOT EXISTS vectors (
        label  INTEGER PRIMARY KEY,
        vector BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS chunks_by_tenant_document ON chunks (tenant, document_id)",
    "CREATE INDEX IF NOT EXISTS chunks_by_seq ON chunks (seq)",
    # A document deleted or replaced at `version`: its chunks older than that are gone and stay gone.
    """CREATE TABLE IF NOT EXISTS cleared_documents (
        tenant      TEXT NOT NULL,
        document_id TEXT NOT NULL,
        version     INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        PRIMARY KEY (tenant, document_id)
    )""",
    "CREATE INDEX IF NOT EXISTS cleared_documents_by_seq ON cleared_documents (seq)",
    # Labels taken out of the index at `seq`, replayed onto snapshots older than that.
    """CREATE TABLE IF NOT EXISTS tombstones (
        label INTEGER PRIMARY KEY,
        seq   INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS tombstones_by_seq ON tombstones (seq)",
    # Parts of a document too big for one log message, kept until the document's own entry
    # arrives and applies them whole (indexer/logapply.py).
    """CREATE TABLE IF NOT EXISTS staged_parts (
        tenant       TEXT NOT NULL,
        document_id  TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        part         INTEGER NOT NULL,
        chunk_id     TEXT NOT NULL,
        text         TEXT NOT NULL,
        source       TEXT NOT NULL,
        metadata     TEXT NOT NULL,
        tags         TEXT NOT NULL,
        vector       BLOB NOT NULL,
        PRIMARY KEY (tenant, document_id, content_hash, chunk_id)
    )""",
    "DROP TABLE IF EXISTS peer_cursors",
)


@dataclass(frozen=True)
class Meta:
    sequence: int
    max_version: int
    #: Tells this store from any other, including one recreated in the same folder.
    store_id: int
    #: The shard log's sequence applied here (0: none, or no log).
    log_sequence: int = 0


def create(db: sqlite3.Connection, path: Path) -> bool:
    """Creates the tables of the database at `path`, upgrading an earlier layout in place.
    Returns whether it upgraded."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
    if "vector" not in columns:  # a new store, or the current layout
        for statement in _SCHEMA:
            db.execute(statement)
        return False
    # Earlier layouts kept vectors in `chunks`, the first also lacked tenants, tags, versions and seq.
    log.info("upgrading %s to the current layout", path)
    db.execute("ALTER TABLE chunks RENAME TO chunks_old")
    for (index,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'chunks_old' AND sql IS NOT NULL"
    ).fetchall():
        db.execute(f'DROP INDEX "{index}"')
    for statement in _SCHEMA:
        db.execute(statement)
    sequence = "(SELECT value FROM meta WHERE key = 'sequence')"
    carried = {"tenant": "''", "tags": "'[]'", "version": str(FIRST_VERSION), "seq": sequence}
    values = ", ".join(name if name in columns else default for name, default in carried.items())
    db.execute(
        f"""INSERT INTO chunks (label, chunk_id, document_id, text, source, metadata, tenant, tags, version, seq)
            SELECT label, chunk_id, document_id, text, source, metadata, {values} FROM chunks_old"""
    )
    db.execute("INSERT INTO vectors (label, vector) SELECT label, vector FROM chunks_old")
    # Labels are never reused, so the AUTOINCREMENT counter carries over.
    db.execute(
        """UPDATE sqlite_sequence SET seq = MAX(seq, (SELECT seq FROM sqlite_sequence WHERE name = 'chunks_old'))
           WHERE name = 'chunks'"""
    )
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'chunks_old'")
    db.execute("DROP TABLE chunks_old")
    return True


def load_meta(db: sqlite3.Connection, dimension: int, data_dir: Path) -> Meta:
    """The shard's meta row, written first for a new store; refuses a store of another dimension."""
    defaults = {"dimension": dimension, "sequence": 0, "max_version": FIRST_VERSION,
                "store_id": secrets.randbits(63) or 1, "log_sequence": 0}
    db.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", defaults.items())
    meta = dict(db.execute("SELECT key, value FROM meta"))
    if meta["dimension"] != dimension:
        raise FailedPrecondition(
            f"shard at {data_dir} holds vectors of dimension {meta['dimension']}, not {dimension}"
        )
    return Meta(sequence=meta["sequence"], max_version=meta["max_version"], store_id=meta["store_id"],
                log_sequence=meta["log_sequence"])
