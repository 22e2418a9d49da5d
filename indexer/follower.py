"""A shard replica follows its shard's log: every entry applied in stream order, the applied sequence
stored in the same SQLite transaction as the writes (ShardStore.apply_log).

It starts from the sequence the store last applied, so a restart resumes exactly there and a wiped
replica replays the stream from the start (the stream keeps one entry per document: replay rebuilds
the current collection). A failed apply (the disk full, say) stops applying: the replica reports
NOT_SERVING with the reason in its Stats, retries with backoff, and resumes from the same entry when
it can; it never skips one. NATS going away costs nothing but freshness: the replica keeps serving
what it has and resubscribes from where it was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fabric.errors import Behind, RagloomError, Unavailable
from fabric.shardlog import LogSettings, connect, ensure_stream, shard_subjects, stream_name
from indexer import convert
from indexer.store import ShardStore

log = logging.getLogger(__name__)

Run = Callable[..., Awaitable]
Report = Callable[[bool], Awaitable[None]]


class Follower:
    def __init__(self, settings: LogSettings, shard_id: int, run: Run, *, batch: int = 256):
        self.settings, self.shard_id, self.run, self.batch = settings, shard_id, run, batch
        #: The log's sequence applied to the store.
        self.applied = 0
        #: The log's last sequence as last seen (applied + what the consumer said was pending).
        self.last_seen = 0
        #: Why applying stopped; empty while it goes.
        self.error = ""
        self.report: Report | None = None
        self._progress = asyncio.Condition()
        self._stopping = asyncio.Event()
        #: Set when the connection came back (to another server, perhaps): the consumer is resubscribed at
        #: once rather than after its heartbeats are missed.
        self._reconnected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._nc = None

    async def start(self, applied: int, catch_up_timeout_s: float) -> None:
        """Connects, then follows from `applied`; returns once caught up with the stream's last sequence
        at the start, or after `catch_up_timeout_s` (serving what it has, still catching up)."""
        self.applied = self.last_seen = applied
        loop = asyncio.get_running_loop()
        give_up = loop.time() + catch_up_timeout_s
        while True:  # the log may come up after this replica (it serves nothing until it has the log)
            try:
                self._nc = await connect(self.settings, f"indexer-{self.shard_id}", reconnected_cb=self._on_reconnect)
                info = await ensure_stream(self._nc.jetstream(), self.shard_id, self.settings.replicas)
                break
            except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds
                if self._nc is not None:
                    await self._nc.close()
                    self._nc = None
                if loop.time() > give_up:
                    raise Unavailable(f"shard {self.shard_id}: its log at {self.settings.url} is unreachable: "
                                      f"{type(exc).__name__}: {exc}") from None
                log.info("shard %d: waiting for its log at %s (%s)", self.shard_id, self.settings.url, exc)
                await asyncio.sleep(0.5)
        self.last_seen = max(self.last_seen, info.state.last_seq)
        self._task = asyncio.create_task(self._follow())
        try:
            await self.wait_applied(info.state.last_seq, catch_up_timeout_s)
        except Behind:
            log.warning("shard %d: not caught up with its log after %.0f s (applied %d of %d); serving, still "
                        "catching up", self.shard_id, catch_up_timeout_s, self.applied, info.state.last_seq)

    async def close(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._nc is not None:
            await self._nc.close()

    async def wait_applied(self, sequence: int, timeout_s: float | None) -> None:
        """Returns once the log is applied through `sequence`; Behind when it is not within `timeout_s`."""
        if self.applied >= sequence:
            return
        try:
            async with self._progress:
                await asyncio.wait_for(self._progress.wait_for(lambda: self.applied >= sequence), timeout_s)
        except asyncio.TimeoutError:
            raise Behind(f"shard {self.shard_id} replica has applied its log through {self.applied}, "
                         f"not yet {sequence}" + (f" ({self.error})" if self.error else "")) from None

    async def _follow(self) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        delay = 0.2
        while not self._stopping.is_set():
            sub = None
            try:
                sub = await self._nc.jetstream().subscribe(
                    shard_subjects(self.shard_id), stream=stream_name(self.shard_id), ordered_consumer=True,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                          opt_start_seq=self.applied + 1),
                )
                delay = 0.2
                idle = 0
                self._reconnected.clear()
                while not self._stopping.is_set():
                    if self._reconnected.is_set():
                        log.info("shard %d: reconnected to the log; subscribing again from %d", self.shard_id,
                                 self.applied + 1)
                        break
                    messages = await self._next_batch(sub)
                    if messages:
                        idle = 0
                        await self._apply(messages)
                        continue
                    idle += 1
                    if idle % 2 == 0 and await self._behind():
                        # The consumer is gone (the server restarted, say) though the log went on:
                        # subscribe afresh from what is applied.
                        log.info("shard %d: the log is at %d, this replica at %d with nothing arriving; "
                                 "subscribing again", self.shard_id, self.last_seen, self.applied)
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the log is away: keep serving, resubscribe from here
                log.warning("shard %d: following the log failed (%s: %s); again in %.1f s", self.shard_id,
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if sub is not None:
                    try:
                        await sub.unsubscribe()
                    except Exception:  # noqa: BLE001 - the connection may be gone already
                        pass

    async def _on_reconnect(self) -> None:
        self._reconnected.set()

    async def _behind(self) -> bool:
        info = await self._nc.jetstream().stream_info(stream_name(self.shard_id))
        self.last_seen = max(self.last_seen, info.state.last_seq)
        return info.state.last_seq > self.applied

    async def _next_batch(self, sub) -> list:
        import nats.errors

        try:
            messages = [await sub.next_msg(timeout=1.0)]
        except nats.errors.TimeoutError:
            return []
        while len(messages) < self.batch:
            try:
                messages.append(await sub.next_msg(timeout=0.002))
            except nats.errors.TimeoutError:
                break
        return messages

    async def _apply(self, messages: list) -> None:
        last = messages[-1].metadata
        through = last.sequence.stream
        records = [convert.log_record(m.subject, m.metadata.sequence.stream, m.data) for m in messages
                   if m.metadata.sequence.stream > self.applied]
        self.last_seen = max(self.last_seen, through + (last.num_pending or 0))
        delay = 0.5
        while True:
            try:
                await self.run(ShardStore.apply_log, records, through)
                break
            except Unavailable:
                raise  # the store is closing
            except Exception as exc:  # noqa: BLE001 - reported, retried, never skipped
                # A domain error (the disk full) says what is wrong already; anything else is named by its type.
                why = exc.message if isinstance(exc, RagloomError) else f"{type(exc).__name__}: {exc}"
                if not self.error:
                    log.error("shard %d: applying log entries %d..%d failed: %s; not serving until it succeeds",
                              self.shard_id, records[0].sequence if records else through, through, why)
                self.error = why
                if self.report is not None:
                    await self.report(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        if self.error:
            log.info("shard %d: applying the log again from sequence %d", self.shard_id, through)
            self.error = ""
            if self.report is not None:
                await self.report(True)
        async with self._progress:
            self.applied = through
            self._progress.notify_all()
