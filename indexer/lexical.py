"""BM25 over the chunks' words: an SQLite FTS5 index beside the chunks table.

The FTS table is an external-content index of `chunks.text` kept in step by triggers, so a
lexical entry is written, replaced and removed in the same transaction as its chunk: it is
exactly as durable as the chunk and never disagrees with it, after a crash included. A store
created before this index existed is indexed once, on open.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Set

SCHEMA = (
    """CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
        text, content='chunks', content_rowid='label', tokenize='porter unicode61 remove_diacritics 2'
    )""",
    """CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts (rowid, text) VALUES (new.label, new.text);
    END""",
    """CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.label, old.text);
    END""",
    """CREATE TRIGGER IF NOT EXISTS chunks_fts_update AFTER UPDATE OF text ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.label, old.text);
        INSERT INTO chunks_fts (rowid, text) VALUES (new.label, new.text);
    END""",
)

# Words too common to say anything about relevance; dropping them keeps the candidate sets small.
_STOPWORDS = frozenset(
    "a an and are as at be but by can could did do does for from had has have how i if in into is it its "
    "of on or so than that the their them then there these they this to was we were what when where which "
    "who whom why will with would you your".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)


def ensure(db: sqlite3.Connection) -> None:
    """Creates the index and its triggers; indexes existing chunks when the index is new."""
    existed = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks_fts'").fetchone() is not None
    for statement in SCHEMA:
        db.execute(statement)
    if not existed:
        db.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild')")


def match_expression(query: str) -> str | None:
    """The query's words as an FTS5 OR-query (each quoted, so no word is read as syntax); None if none."""
    words = [w for w in dict.fromkeys(_WORD.findall(query.lower())) if w not in _STOPWORDS]
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def top(db: sqlite3.Connection, query: str, k: int, allowed: Set[int]) -> list[tuple[int, float]]:
    """The `k` best (label, BM25 score) among `allowed` labels, best first (higher is better)."""
    expression = match_expression(query)
    if expression is None or k <= 0 or not allowed:
        return []
    found = []
    # FTS5's bm25() is smaller for better matches; rows come in that order, so stop at k allowed ones.
    for label, score in db.execute(
        "SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank", (expression,)
    ):
        if label in allowed:
            found.append((label, -score))
            if len(found) == k:
                break
    return found
