"""The shards' log on NATS JetStream: what the router publishes and every shard replica follows.

One stream per shard (`RAGLOOM_SHARD_<n>`), file storage, subjects per document, one message kept per
subject: the stream is compacted to the current collection, so replaying it rebuilds a replica. An
entry is a `ragloom.indexer.v1.LogEntry`; its `Nats-Msg-Id` is the document and its content hash,
so a retried publish within the duplicate window is one entry.

  ragloom.shard.<n>.doc.<key>                   the document's entry: its chunks, or its deletion
  ragloom.shard.<n>.part.<key>.<hash>.<i>       part i of a document too big for one message; the
                                                entry on .doc.<key> says how many, and comes last

`<key>` is a digest of (tenant, document id): subjects stay short and free of the characters NATS
gives meaning to, and tenants cannot collide.

The collection generations that key the router's answer cache live beside it, in a KV bucket.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass

STREAM_PREFIX = "RAGLOOM_SHARD_"
SUBJECT_PREFIX = "ragloom.shard"
GENERATIONS_BUCKET = "ragloom_generations"
#: How long JetStream remembers a Nats-Msg-Id: a client's retry within it is deduplicated.
DUPLICATE_WINDOW_S = 120.0
#: Headers of an entry (readable without decoding it).
CONTENT_HASH = "Ragloom-Content-Hash"
CHUNKS = "Ragloom-Chunks"


def stream_name(shard: int) -> str:
    return f"{STREAM_PREFIX}{shard}"


def shard_subjects(shard: int) -> str:
    return f"{SUBJECT_PREFIX}.{shard}.>"


def document_key(tenant: str, document_id: str) -> str:
    return hashlib.sha256(f"{tenant}\0{document_id}".encode()).hexdigest()[:32]


def document_subject(shard: int, tenant: str, document_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{shard}.doc.{document_key(tenant, document_id)}"


def part_subject(shard: int, tenant: str, document_id: str, content_hash: str, index: int) -> str:
    return f"{part_prefix(shard, tenant, document_id)}.{content_hash}.{index}"


def part_prefix(shard: int, tenant: str, document_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{shard}.part.{document_key(tenant, document_id)}"


def is_part(subject: str) -> bool:
    return ".part." in subject


def generation_key(tenant: str) -> str:
    """The KV key of a tenant's collection generation ("" is a tenant too)."""
    return "t" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class LogSettings:
    """Where the log is and how to reach it."""

    #: One server, or several comma-separated (a cluster: the client fails over between them).
    url: str
    #: Replicas of each stream (Raft): 3 in a cluster, 1 on one machine.
    replicas: int = 1
    #: PEM files for TLS to the NATS server (its certificate must chain to `tls_ca`); empty: plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls_ca:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


async def connect(settings: LogSettings, name: str, *, connect_timeout_s: float = 5.0, **options):
    """A NATS connection that keeps reconnecting (forever) when the server goes away."""
    import nats

    return await nats.connect(
        servers=[url.strip() for url in settings.url.split(",") if url.strip()], name=name, tls=settings.ssl_context(), connect_timeout=connect_timeout_s,
        max_reconnect_attempts=-1, reconnect_time_wait=0.5, allow_reconnect=True, **options,
    )


async def ensure_stream(js, shard: int, replicas: int = 1):
    """The shard's stream, created if missing (every publisher and follower may call this)."""
    from nats.js.api import DiscardPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    name = stream_name(shard)
    try:
        return await js.stream_info(name)
    except NotFoundError:
        pass
    config = StreamConfig(
        name=name, subjects=[shard_subjects(shard)], storage=StorageType.FILE, num_replicas=replicas,
        max_msgs_per_subject=1, discard=DiscardPolicy.OLD, duplicate_window=DUPLICATE_WINDOW_S,
        allow_direct=True,
    )
    return await js.add_stream(config)
