"""SQLite plumbing shared by the store's modules: the writer connection, read-only connections
per thread, explicit transactions, and `IN (...)` lookups a batch of keys at a time.

Durability. An Upsert or Delete is acknowledged only after its transaction has COMMITted,
and the writer connection runs in WAL mode with synchronous=FULL: COMMIT appends the
transaction's pages to the write-ahead log and fsyncs the log before it returns. A crash
at any instant therefore keeps a transaction whole or loses one that was never
acknowledged (WAL frames carry checksums and a commit marker, and recovery drops a torn
tail). Nothing acknowledged lives only in memory.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# Keeps every `IN (...)` list well under SQLite's bound-parameter limit.
_SQL_BATCH = 500
#: Rows read at a time while rebuilding or replaying the index, or searching exactly.
READ_BATCH = 10_000
_MMAP_BYTES = 1 << 32


def connect(path: Path) -> sqlite3.Connection:
    """The store's writer connection to the database at `path`."""
    # isolation_level=None: transactions are begun and committed explicitly in `transaction`.
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        # Reads through a memory map: the payload lookups of every search skip read() and a copy.
        db.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
    except BaseException:
        db.close()
        raise
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK should the body raise."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def select(db: sqlite3.Connection, sql: str, keys: Sequence, *leading) -> Iterator[tuple]:
    """Runs `sql` with `leading` parameters, then its `IN ({})` bound to `keys`, a batch at a time."""
    for start in range(0, len(keys), _SQL_BATCH):
        batch = keys[start : start + _SQL_BATCH]
        yield from db.execute(sql.format(",".join("?" * len(batch))), (*leading, *batch)).fetchall()


class Readers:
    """A read-only connection for each thread that asks (WAL lets readers run beside the writer)."""

    def __init__(self, path: Path):
        self._path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    def connection(self) -> sqlite3.Connection:
        """The calling thread's connection, opened on its first call."""
        reader = getattr(self._local, "connection", None)
        if reader is None:
            # check_same_thread off only so that `close` can close it; it is used by its own thread alone.
            reader = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, check_same_thread=False)
            reader.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
            self._local.connection = reader
            with self._lock:
                self._connections.append(reader)
        return reader

    def close(self) -> None:
        """Closes every thread's connection; no thread may be reading any more."""
        with self._lock:
            for reader in self._connections:
                reader.close()
            self._connections.clear()
