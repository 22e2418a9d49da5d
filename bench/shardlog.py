"""The shards' log against the direct write path, on one machine.

Baseline: the same chunks (random unit vectors, documents of 10 chunks, 4 writers) upserted straight
into a standalone shard process, measured in the same run. Then through the log: published to a real
nats-server (JetStream, fsync before ack) until one following replica has applied all of it. Then the
replica is killed (-9) and wiped and rebuilt by replaying the stream, and killed again and restarted
(snapshot + replay): each timed from start to SERVING (caught up).

    python bench/shardlog.py [--chunks 100000] [--dimension 384]

The last line is one JSON object. Embedding is not part of either path here; in a real ingest it
dominates (bench/spine.py), so the ratio below is a lower bound of the end-to-end one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fabric.shardlog import LogSettings  # noqa: E402
from ragloom.indexer.v1 import indexer_pb2  # noqa: E402
from router.domain import ChunkWrite  # noqa: E402
from router.shardlog import ShardLog  # noqa: E402
from tests.indexer.shards import ShardProcess, unit_vectors  # noqa: E402
from tests.support.nats import NatsProcess  # noqa: E402

PER_DOC = 10


async def pool(jobs, concurrency: int = 4):
    queue = list(jobs)
    results = []

    async def worker():
        while queue:
            results.append(await queue.pop(0)())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--dimension", type=int, default=384)
    args = parser.parse_args()
    docs = args.chunks // PER_DOC
    vectors = unit_vectors(min(args.chunks, 20_000), args.dimension, seed=1)

    def chunk(d: int, i: int) -> ChunkWrite:
        return ChunkWrite(f"doc-{d}#{i}", f"doc-{d}", f"document {d}, passage {i} " * 8, f"doc-{d}.txt",
                          vectors[(d * PER_DOC + i) % len(vectors)].tolist())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nats = NatsProcess(tmp / "nats").start()
        direct = ShardProcess(tmp / "direct", args.dimension, "--snapshot-every", "1000000")
        follower = ShardProcess(tmp / "follower", args.dimension, "--nats-url", nats.url)
        try:
            stub = await direct.start()
            started = time.perf_counter()

            def upsert(d: int):
                request = indexer_pb2.UpsertRequest(replace_documents=True, chunks=[
                    indexer_pb2.Chunk(chunk_id=c.chunk_id, document_id=c.document_id, text=c.text, source=c.source,
                                      vector=c.vector) for c in (chunk(d, i) for i in range(PER_DOC))])
                return lambda: stub.Upsert(request, timeout=60)

            await pool(upsert(d) for d in range(docs))
            direct_s = time.perf_counter() - started
            await direct.close()

            log = ShardLog(LogSettings(nats.url), shards=1)
            fstub = await follower.start()
            started = time.perf_counter()
            acks = await pool(lambda d=d: log.write_document(0, "", f"doc-{d}", [chunk(d, i) for i in range(PER_DOC)],
                                                             f"h{d}") for d in range(docs))
            last = max(a.sequence for a in acks)
            await fstub.Search(indexer_pb2.SearchRequest(queries=[indexer_pb2.Vector(values=vectors[0])], k=1,
                                                         min_sequence=last), timeout=600)
            log_s = time.perf_counter() - started

            follower.kill()
            shutil.rmtree(tmp / "follower")
            started = time.perf_counter()
            await follower.start(timeout_s=3600)
            replay_s = time.perf_counter() - started
            await follower.stub().Stats(indexer_pb2.StatsRequest(), timeout=60)
            follower.stop()  # graceful: a snapshot at the applied sequence
            started = time.perf_counter()
            await follower.start(timeout_s=3600)
            restart_s = time.perf_counter() - started
            follower.kill()
            started = time.perf_counter()
            await follower.start(timeout_s=3600)
            kill9_s = time.perf_counter() - started
            await log.close()
        finally:
            await asyncio.gather(direct.close(), follower.close())
            nats.stop()
    chunks = docs * PER_DOC
    print(json.dumps({
        "chunks": chunks, "dimension": args.dimension,
        "baseline": "direct Upsert to a standalone shard, same chunks, same run",
        "direct_chunks_per_s": round(chunks / direct_s, 1),
        "log_chunks_per_s": round(chunks / log_s, 1),
        "log_vs_direct": round(direct_s / log_s, 3),
        "rebuild_by_replay_chunks_per_s": round(chunks / replay_s, 1),
        "restart_snapshot_plus_replay_s": round(restart_s, 2),
        "kill9_to_serving_s": round(kill9_s, 2),
    }))


if __name__ == "__main__":
    asyncio.run(main())
