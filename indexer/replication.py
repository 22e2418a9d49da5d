"""Replica catch-up: each replica of a shard pulls from its peers the changes it has not applied.

The router writes to every replica and acknowledges at a quorum, so a replica that was
down, or missed a write for any reason, lacks it. Each replica therefore pulls, on start
(before it reports SERVING) and then periodically, the `Changes` stream of every peer
and applies it with last-writer-wins (ShardStore.apply_changes), which makes applying
idempotent and order-independent: echoes of its own writes and overlapping pulls cost
bandwidth, never correctness.

Cursor. A pull resumes after the peer's sequence number it last applied, per peer and
per peer store (a peer whose store was recreated gets a new store id and is pulled from
the start). A peer's sequence orders the changes *it* applied, late ones included, so a
write this replica missed while it was up, or one that reached the peer with an old
version, still arrives. (Resuming from this replica's own highest version instead would
skip such writes for good.) The cursor is saved in the same transaction as the changes
it covers.

Limits.
  * Last writer wins by version, so the versions the routers stamp decide: with clocks
    skewed between routers, a write can lose to an earlier one stamped by a clock that
    runs ahead. Two writes with equal versions and different content may leave replicas
    different; routers should make versions unique (e.g. strictly increasing per router,
    router id in the low bits).
  * Deletions are kept as per-document marks forever (one small row per deleted or
    replaced document), so a late, older write never resurrects a deleted document.
  * Convergence is eventual: between pulls a replica answers from what it has. On start
    it pulls until caught up with every peer it reaches (a pull cut by its deadline is
    resumed while it advances); a replica that reaches no peer serves what it holds.
  * Each change a replica applies comes back to it once from every peer that pulled it
    (a no-op echo): with R replicas a write crosses the network up to R(R-1) extra
    times. Fine for the small R of a shard; a digest exchange would avoid it.
  * First contact with a peer store (or a recreated one) copies it whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from indexer.convert import change_page
from indexer.store import ShardStore
from fabric.client import channel
from fabric.errors import RagloomError
from fabric.telemetry import outgoing_metadata
from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class PeerState:
    address: str
    store_id: int = 0
    sequence: int = 0
    #: time.monotonic() of the last complete pull; None before the first.
    caught_up_at: float | None = None
    error: str = ""


class CatchUp:
    """Pulls changes from the peer replicas of one shard into its store."""

    def __init__(self, run, peers: list[str], shard_id: int, timeout_s: float, batch_size: int, identity=None):
        # `run(call, *args)` runs `call(store, *args)` on the store's thread.
        self._run = run
        self._identity = identity  # this replica's mTLS identity: peers admit the indexer's SPIFFE id
        self._shard_id = shard_id
        self._timeout_s = timeout_s
        self._batch_size = batch_size
        self.peers = {address: PeerState(address) for address in dict.fromkeys(peers)}
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def pull_all(self, until_complete: bool = False) -> None:
        """A pull from every peer, concurrently; a peer that fails is reported in its state.

        With `until_complete`, a pull cut short by its deadline while still advancing is resumed
        until it reaches the end (a replica starting empty copies a large peer before it serves).
        """

        async def from_peer(address: str) -> None:
            while True:
                before = self.peers[address].sequence if address in self.peers else None
                complete = await self.pull(address)
                if complete or not until_complete or address not in self.peers:
                    return
                if self.peers[address].sequence == before:
                    return

        await asyncio.gather(*(from_peer(address) for address in list(self.peers)))

    async def pull(self, address: str) -> bool:
        """Applies what `address` has that this shard lacks, from where the last pull stopped.
        Returns whether it got to the end of the peer's changes."""
        state = self.peers[address]
        own_store = await self._run(lambda store: store.store_id)
        state.store_id, state.sequence = await self._run(ShardStore.peer_cursor, address)
        request = indexer_pb2.ChangesRequest(
            since_sequence=state.sequence, store_id=state.store_id, shard_id=self._shard_id, batch_size=self._batch_size
        )
        changed = 0
        call = self._stub(address).Changes(request, timeout=self._timeout_s, metadata=outgoing_metadata())
        try:
            async for batch in call:
                if batch.store_id == own_store:
                    call.cancel()
                    log.warning("peer %s is this shard itself: not pulling from it", address)
                    del self.peers[address]
                    return False
                changed += await self._run(ShardStore.apply_changes, change_page(batch), address)
                state.store_id, state.sequence = batch.store_id, batch.sequence
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            # Said once per new problem: a peer that stays down would otherwise fill the log.
            log.log(logging.DEBUG if error == state.error else logging.WARNING,
                    "catch-up from %s stopped: %s (%d changes applied)", address, error, changed)
            state.error = error
            return False
        except RagloomError as exc:  # the peer sent something this shard refuses (another dimension, ...)
            call.cancel()
            state.error = exc.message
            log.error("catch-up from %s refused: %s", address, exc.message)
            return False
        state.caught_up_at, state.error = time.monotonic(), ""
        if changed:
            log.info("caught up with %s: %d changes applied", address, changed)
        return True

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()

    def _stub(self, address: str) -> indexer_pb2_grpc.IndexerServiceStub:
        if address not in self._channels:
            self._channels[address] = channel(address, identity=self._identity)
        return indexer_pb2_grpc.IndexerServiceStub(self._channels[address])
