"""Which shard holds a document: a stable hash of its id, the same in every process and release."""

from __future__ import annotations

import hashlib


def shard_for(document_id: str, shards: int) -> int:
    digest = hashlib.blake2b(document_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards
