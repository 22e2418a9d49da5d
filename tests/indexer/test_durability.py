"""An acknowledged write survives kill -9, and a torn snapshot costs replay time, never data.

Real shard processes, killed with SIGKILL while a client writes to them.
"""

from __future__ import annotations

import asyncio
import json
import random

import grpc
import pytest

from indexer.snapshots import FOLDER
from ragloom.indexer.v1 import indexer_pb2

from tests.indexer.shards import ShardProcess, nearest, unit_vectors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DIM = 32
CHUNKS_PER_DOCUMENT = 5


class Ledger:
    """What the client knows: written and acknowledged, deleted and acknowledged, or in doubt."""

    def __init__(self, seed: int = 0):
        self.vectors = unit_vectors(20_000, DIM, seed)
        self.live: dict[str, list[int]] = {}  # document id -> rows of `vectors` holding its chunks
        self.deleted: set[str] = set()
        self.in_doubt: set[str] = set()
        self._next_row = 0
        self._rng = random.Random(seed)

    def new_documents(self, count: int) -> list[tuple[str, list[int]]]:
        documents = []
        for _ in range(count):
            rows = list(range(self._next_row, self._next_row + CHUNKS_PER_DOCUMENT))
            self._next_row += CHUNKS_PER_DOCUMENT
            documents.append((f"doc{rows[0] // CHUNKS_PER_DOCUMENT}", rows))
        return documents

    def upsert_request(self, documents) -> indexer_pb2.UpsertRequest:
        return indexer_pb2.UpsertRequest(
            chunks=[
                indexer_pb2.Chunk(chunk_id=f"{doc}#{i}", document_id=doc, text=f"{doc} part {i}", vector=self.vectors[row])
                for doc, rows in documents
                for i, row in enumerate(rows)
            ],
            replace_documents=True,
        )

    async def write_until_killed(self, stub) -> int:
        """Upserts batches of documents and now and then deletes one, until the shard goes away."""
        writes = 0
        while True:
            if self.live and self._rng.random() < 0.2:
                doc = self._rng.choice(sorted(self.live))
                try:
                    await stub.Delete(indexer_pb2.DeleteRequest(document_ids=[doc]), timeout=10)
                except grpc.aio.AioRpcError:
                    self.in_doubt.add(doc)
                    self.live.pop(doc)
                    return writes
                self.live.pop(doc)
                self.deleted.add(doc)
            else:
                documents = self.new_documents(5)
                try:
                    await stub.Upsert(self.upsert_request(documents), timeout=10)
                except grpc.aio.AioRpcError:
                    self.in_doubt.update(doc for doc, _ in documents)
                    return writes
                self.live.update(documents)
            writes += 1

    async def check(self, stub) -> None:
        """Every acknowledged chunk is found by searching its own vector; no acknowledged delete is."""
        rows = [row for doc in sorted(self.live) for row in self.live[doc]]
        expected = [f"{doc}#{i}" for doc in sorted(self.live) for i in range(CHUNKS_PER_DOCUMENT)]
        found = []
        for start in range(0, len(rows), 1000):
            found += [ids[0] if ids else "" for ids in await nearest(stub, self.vectors[rows[start : start + 1000]])]
        missing = [e for e, f in zip(expected, found) if e != f]
        assert not missing, f"{len(missing)} acknowledged chunks not found, e.g. {missing[:5]}"
        stats = await stub.Stats(indexer_pb2.StatsRequest(), timeout=10)
        doubtful = len(self.in_doubt) * CHUNKS_PER_DOCUMENT
        assert len(rows) <= stats.live_chunks <= len(rows) + doubtful
        if self.deleted:
            deleted_rows = [self.live_rows_of_deleted(doc)[0] for doc in sorted(self.deleted)]
            hits = await nearest(stub, self.vectors[deleted_rows])
            assert not [ids for ids in hits if ids and ids[0].split("#")[0] in self.deleted]

    def live_rows_of_deleted(self, doc: str) -> list[int]:
        first = int(doc.removeprefix("doc")) * CHUNKS_PER_DOCUMENT
        return list(range(first, first + CHUNKS_PER_DOCUMENT))


async def test_acknowledged_writes_survive_repeated_kill_9_during_ingest(tmp_path):
    shard = ShardProcess(tmp_path / "shard", DIM, "--snapshot-every", "100", "--snapshot-interval-s", "0.3")
    ledger = Ledger()
    rng = random.Random(1)
    try:
        for round_ in range(5):
            stub = await shard.start()
            await ledger.check(stub)
            writer = asyncio.ensure_future(ledger.write_until_killed(stub))
            await asyncio.sleep(rng.uniform(0.4, 1.2))
            shard.kill()
            writes = await asyncio.wait_for(writer, timeout=15)
            assert writes > 0, f"round {round_}: no write got through"
            await shard.close()

        stub = await shard.start()
        await ledger.check(stub)
        stats = await stub.Stats(indexer_pb2.StatsRequest(), timeout=10)
        assert stats.snapshot_sequence > 0  # snapshots were taken along the way, and loaded
        assert len(ledger.live) > 50 and ledger.deleted
    finally:
        await shard.close()
    assert "Traceback" not in shard.log_path.read_text()


def manifests(data_dir) -> list[dict]:
    return sorted(
        (json.loads(p.read_text()) for p in (data_dir / FOLDER).glob("*.json")), key=lambda m: m["sequence"]
    )


async def test_a_torn_snapshot_falls_back_to_the_previous_one_plus_replay(tmp_path):
    # Snapshots only at shutdown, so the test decides when they are taken.
    shard = ShardProcess(tmp_path / "shard", DIM, "--snapshot-every", "1000000", "--snapshot-interval-s", "0")
    ledger = Ledger(seed=2)
    try:
        for _ in range(2):  # two graceful stops: two snapshots
            stub = await shard.start()
            for _ in range(10):
                documents = ledger.new_documents(4)
                await stub.Upsert(ledger.upsert_request(documents), timeout=10)
                ledger.live.update(documents)
            assert shard.stop() == 0
            await shard.close()
        older, newer = manifests(shard.data_dir)
        stub = await shard.start()
        deleted = sorted(ledger.live)[:3]
        await stub.Delete(indexer_pb2.DeleteRequest(document_ids=deleted), timeout=10)
        for doc in deleted:
            ledger.live.pop(doc)
            ledger.deleted.add(doc)
        documents = ledger.new_documents(6)
        await stub.Upsert(ledger.upsert_request(documents), timeout=10)
        ledger.live.update(documents)
        shard.kill()  # no snapshot of the last writes
        await shard.close()

        index = shard.data_dir / FOLDER / f"snapshot-{newer['sequence']:020d}.hnsw"
        data = bytearray(index.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a torn page in the middle
        index.write_bytes(bytes(data))

        stub = await shard.start()
        stats = await stub.Stats(indexer_pb2.StatsRequest(), timeout=10)
        assert stats.snapshot_sequence == older["sequence"] < newer["sequence"] < stats.sequence
        await ledger.check(stub)
    finally:
        await shard.close()
    log = shard.log_path.read_text()
    assert "does not match its checksum" in log and f"loaded snapshot at sequence {older['sequence']}" in log
