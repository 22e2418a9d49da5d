"""The router's side of the shards' log (fabric/shardlog.py): a write is acknowledged when JetStream has
it, and its stream sequence is the consistency token a later read can wait for.

A document is one entry on its own subject, replacing the one before (the stream keeps one per
subject). The same content again (a client's retry) is recognised by its content hash against the
subject's last entry, and within JetStream's duplicate window by its Nats-Msg-Id too: it is one
entry, acknowledged with the sequence it already has. A document bigger than one message goes as
parts first, then its entry naming how many; the parts of earlier contents are purged after.

The tenants' collection generations (part of every answer-cache key) are a KV bucket beside the
streams, bumped by every acknowledged write: a router restart, or another router, can never serve an
answer about a document deleted since.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fabric.errors import Unavailable
from fabric.shardlog import (
    CHUNKS, CONTENT_HASH, GENERATIONS_BUCKET, LogSettings, connect, document_subject, ensure_stream,
    generation_key, part_prefix, part_subject, stream_name,
)
from ragloom.indexer.v1 import indexer_pb2
from router.domain import ChunkWrite

log = logging.getLogger(__name__)

# Room left in a message for the entry's framing and headers.
_HEADROOM = 16 * 1024


@dataclass(frozen=True)
class Acked:
    """A write the log has: its sequence in the shard's stream, and the chunks the document had before."""

    sequence: int
    previous_chunks: int
    #: The same content was already the document's entry: nothing new was written.
    unchanged: bool = False


class ShardLog:
    def __init__(self, settings: LogSettings, shards: int, timeout_s: float = 10.0):
        self.settings, self.shards, self.timeout_s = settings, shards, timeout_s
        self._nc = None
        self._js = None
        self._kv = None
        self._ready: set[int] = set()
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Connects (a log that is down now is retried at each write, not fatal here)."""
        try:
            await self._connected()
        except Unavailable as exc:
            log.warning("%s; writes fail with UNAVAILABLE until it is back", exc)

    async def _connected(self):
        if self._js is not None and self._nc.is_connected:
            return self._js
        async with self._lock:
            if self._nc is None:
                try:
                    self._nc = await connect(self.settings, "router", connect_timeout_s=min(self.timeout_s, 5.0))
                except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds
                    self._nc = None
                    raise Unavailable(f"NATS (the shards' log) at {self.settings.url} is unreachable: "
                                      f"{type(exc).__name__}: {exc}") from None
                self._js = self._nc.jetstream(timeout=self.timeout_s)
            if not self._nc.is_connected:
                raise Unavailable(f"NATS (the shards' log) at {self.settings.url} is unreachable (reconnecting)")
        return self._js

    async def _stream(self, shard: int):
        js = await self._connected()
        if shard not in self._ready:
            await self._call("create the stream of shard %d" % shard, ensure_stream(js, shard, self.settings.replicas))
            self._ready.add(shard)
        return js

    async def _call(self, what: str, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.timeout_s)
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - timeouts, no responders, JetStream API errors
            raise Unavailable(f"NATS (the shards' log) could not {what}: {type(exc).__name__}: {exc}") from None

    async def _last(self, js, shard: int, subject: str):
        """The subject's current entry (None when it has none)."""
        from nats.js.errors import NotFoundError

        try:
            return await js.get_last_msg(stream_name(shard), subject, direct=True)
        except NotFoundError:
            return None

    async def write_document(self, shard: int, tenant: str, document_id: str, chunks: Sequence[ChunkWrite],
                             content_hash: str) -> Acked:
        js = await self._stream(shard)
        subject = document_subject(shard, tenant, document_id)
        last = await self._call("read a document's entry", self._last(js, shard, subject))
        previous = int((last.headers or {}).get(CHUNKS, 0)) if last is not None else 0
        if last is not None and (last.headers or {}).get(CONTENT_HASH) == content_hash:
            return Acked(last.seq, previous, unchanged=True)
        entries = _split(tenant, document_id, chunks, content_hash, self._nc.max_payload - _HEADROOM)
        headers = {CONTENT_HASH: content_hash, CHUNKS: str(len(chunks))}
        first_part = None
        for i, part in enumerate(entries[:-1]):
            ack = await self._call("take a document part", js.publish(
                part_subject(shard, tenant, document_id, content_hash, i), part.SerializeToString(),
                stream=stream_name(shard), headers={"Nats-Msg-Id": f"{subject}.{content_hash}.{i}"}))
            first_part = first_part or ack.seq
        ack = await self._call("take the write", js.publish(
            subject, entries[-1].SerializeToString(), stream=stream_name(shard),
            headers={**headers, "Nats-Msg-Id": f"{subject}.{content_hash}"}))
        # Parts of earlier contents are of no use any more (this entry replaced the one naming them).
        await self._purge_parts(js, shard, tenant, document_id, first_part or ack.seq)
        return Acked(ack.seq, previous)

    async def delete_document(self, shard: int, tenant: str, document_id: str) -> Acked:
        js = await self._stream(shard)
        subject = document_subject(shard, tenant, document_id)
        last = await self._call("read a document's entry", self._last(js, shard, subject))
        if last is None:
            return Acked(0, 0, unchanged=True)
        if (last.headers or {}).get(CONTENT_HASH) == "deleted":
            return Acked(last.seq, 0, unchanged=True)
        entry = indexer_pb2.LogEntry(tenant=tenant, document_id=document_id, delete=indexer_pb2.DocumentDeleted())
        previous = int((last.headers or {}).get(CHUNKS, 0))
        ack = await self._call("take the delete", js.publish(
            subject, entry.SerializeToString(), stream=stream_name(shard),
            headers={CONTENT_HASH: "deleted", CHUNKS: "0"}))
        await self._purge_parts(js, shard, tenant, document_id, ack.seq)
        return Acked(ack.seq, previous)

    async def _purge_parts(self, js, shard: int, tenant: str, document_id: str, before: int) -> None:
        try:
            await js.purge_stream(stream_name(shard), subject=f"{part_prefix(shard, tenant, document_id)}.>", seq=before)
        except Exception as exc:  # noqa: BLE001 - stale parts cost space, never correctness
            log.info("could not purge old parts of %r: %s", document_id, exc)

    # ---- collection generations (the answer cache's key) -------------------------------------
    async def _bucket(self):
        js = await self._connected()  # fails at once while the log is away, not after a timeout
        if self._kv is None:
            from nats.js.api import KeyValueConfig, StorageType
            from nats.js.errors import BucketNotFoundError

            try:
                self._kv = await js.key_value(GENERATIONS_BUCKET)
            except BucketNotFoundError:
                self._kv = await js.create_key_value(KeyValueConfig(
                    bucket=GENERATIONS_BUCKET, history=1, storage=StorageType.FILE, replicas=self.settings.replicas))
        return self._kv

    async def generation(self, tenant: str) -> int:
        """The tenant's collection generation: the KV revision of its last write (0 before any)."""
        from nats.js.errors import KeyNotFoundError

        kv = await self._call("open the generations bucket", self._bucket())

        async def read() -> int:
            try:
                return (await kv.get(generation_key(tenant))).revision
            except KeyNotFoundError:  # no write to this tenant yet
                return 0

        return await self._call("read a generation", read())

    async def bump(self, tenant: str) -> int:
        kv = await self._call("open the generations bucket", self._bucket())
        return await self._call("bump a generation", kv.put(generation_key(tenant), b"1"))

    async def close(self) -> None:
        if self._nc is not None:
            try:
                await self._nc.drain()
            except Exception:  # noqa: BLE001 - closing anyway
                await self._nc.close()


def _split(tenant: str, document_id: str, chunks: Sequence[ChunkWrite], content_hash: str,
           limit: int) -> list[indexer_pb2.LogEntry]:
    """The document as entries of at most `limit` bytes: its parts (if any), then its entry."""
    messages = [_chunk(c) for c in chunks]
    whole = indexer_pb2.LogEntry(tenant=tenant, document_id=document_id,
                                 put=indexer_pb2.DocumentChunks(chunks=messages, content_hash=content_hash))
    if whole.ByteSize() <= limit:
        return [whole]
    parts: list[indexer_pb2.LogEntry] = []
    current = indexer_pb2.LogEntry(tenant=tenant, document_id=document_id,
                                   put=indexer_pb2.DocumentChunks(content_hash=content_hash))
    for message in messages:
        if current.put.chunks and current.ByteSize() + message.ByteSize() + 8 > limit:
            parts.append(current)
            current = indexer_pb2.LogEntry(tenant=tenant, document_id=document_id,
                                           put=indexer_pb2.DocumentChunks(content_hash=content_hash))
        current.put.chunks.append(message)
    parts.append(current)
    head = indexer_pb2.LogEntry(tenant=tenant, document_id=document_id,
                                put=indexer_pb2.DocumentChunks(content_hash=content_hash, parts=len(parts)))
    return [*parts, head]


def _chunk(c: ChunkWrite) -> indexer_pb2.Chunk:
    return indexer_pb2.Chunk(chunk_id=c.chunk_id, document_id=c.document_id, text=c.text, source=c.source,
                             metadata=c.metadata, vector=c.vector, tenant=c.tenant, tags=c.tags)
