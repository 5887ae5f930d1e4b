"""The outbox relay: publish each shard's committed outbox rows to the stream.

    loop: hold the shard's relay lease ─▶ read a batch of unpublished rows (seq order)
          ─▶ publish (pipelined, dedup id = event id) ─▶ mark exactly those rows published
          ─▶ wait for NOTIFY (Postgres) or the poll interval when the outbox is empty

Invariants:
- A row is marked published only after the broker acknowledged it.
- No committed row is ever skipped: every pass selects `published_at IS NULL`,
  not `seq > last_seen` (ids are allocated before commit and commit out of
  order), and marks rows by their exact seq list, never by range.
- One relay per shard is active (a lease row on the shard). If a paused relay
  outlives its lease, two may publish the same row; the broker de-duplicates
  by event id, so a row is published at least once and at most twice.
- When the broker is down the relay backs off (bounded, jittered) and emits
  keep committing; nothing is lost, the outbox grows and drains later.
- With a stream that is not durable (`memory://`), "acknowledged" means
  settled: every consumer group finished the event. Until then the row stays
  unpublished in the outbox and the relay holds its seq in memory (so it is
  not published twice by this process), at most `max_unsettled` of them: a
  slow consumer stalls the relay instead of growing the heap. A process killed
  at any point leaves those rows unpublished, and whichever relay holds the
  lease next publishes them again (consumers' inboxes absorb the repeats).

    settle mode: fetch rows not handed ─▶ hand to the stream ─▶ ... settled(events)
                 ─▶ mark exactly those rows published (batched, by seq)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tenfold.data.base import Record
from tenfold.errors import DataError
from tenfold.events.base import Event, StreamBackend, TopicSpec
from tenfold.events.outbox import PENDING, ROW, event_of_row
from tenfold.observe import metrics
from tenfold.resilience.backoff import Backoff

__all__ = ["OutboxRelay"]

log = logging.getLogger("tenfold.events.relay")


_PENDING_SEQS = "SELECT seq FROM tenfold_outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1"


def _padded(seqs: Sequence[int]) -> list[int]:
    # Seq lists are padded (repeating the last) to a power of two so a shard
    # sees a few distinct statements (prepared-statement cache), not one per size.
    size = 1
    while size < len(seqs):
        size *= 2
    return [*seqs, *[seqs[-1]] * (size - len(seqs))]


class OutboxRelay:
    """Publishes one shard's outbox. Run `run()` as a task; `stop()` ends it.

    Args:
        db: the `ShardedDatabase` (only its public API is used).
        shard: the shard whose outbox this relay drains.
        backend: where events are published.
        topics: declared topics; rows of other topics use `TopicSpec` defaults.
    """

    def __init__(
        self,
        db: Any,
        shard: str,
        backend: StreamBackend,
        topics: Mapping[str, TopicSpec],
        *,
        batch_size: int = 256,
        poll_interval_s: float = 0.2,
        linger_s: float = 0.0,
        lease_s: float = 10.0,
        retention_s: float = 3600.0,
        max_backoff_s: float = 5.0,
        max_unsettled: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.shard = shard
        self.backend = backend
        self.topics = dict(topics)
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.linger_s = linger_s
        self.lease_s = lease_s
        self.retention_s = retention_s
        self.max_backoff_s = max_backoff_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._ensured: set[str] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lease_until = 0.0
        self._listener: Any = None
        self.published = 0
        # Settle mode (a stream that dies with the process): see the module docstring.
        self.settle_mode = not backend.durable
        self.max_unsettled = max_unsettled
        self._handed: dict[str, int] = {}  # event id -> outbox seq, handed and not settled
        self._settled: list[int] = []  # seqs settled by the stream, to mark published
        self.settle_flush_s = 0.05  # longest a settlement waits to be marked when idle
        self._flush: asyncio.TimerHandle | None = None
        if self.settle_mode:
            backend.on_settled(self._on_settled)

    # -- lease --------------------------------------------------------------

    async def hold_lease(self) -> bool:
        """Take or renew this shard's relay lease; False while another relay holds it."""
        now = self._clock()
        if self._lease_until - now > self.lease_s * 2 / 3:
            return True
        until = now + self.lease_s
        async with self.db.shard(self.shard) as conn:
            won = await conn.execute(
                "UPDATE tenfold_relay_lease SET owner = $1, expires_at = $2 "
                "WHERE name = 'outbox' AND (owner = $1 OR expires_at < $3)",
                self.owner,
                until,
                now,
            )
            if not won:
                won = await conn.execute(
                    "INSERT INTO tenfold_relay_lease (name, owner, expires_at) "
                    "VALUES ('outbox', $1, $2) ON CONFLICT (name) DO NOTHING",
                    self.owner,
                    until,
                )
        self._lease_until = until if won else 0.0
        return bool(won)

    async def release_lease(self) -> None:
        self._lease_until = 0.0
        async with self.db.shard(self.shard) as conn:
            await conn.execute(
                "DELETE FROM tenfold_relay_lease WHERE name = 'outbox' AND owner = $1", self.owner
            )

    # -- one pass -----------------------------------------------------------

    async def run_once(self) -> int:
        """Publish one batch of pending rows; return how many were published."""
        if self.settle_mode:
            count = await self._hand_over(self.batch_size)
            await self.mark_settled()
            return count
        rows = await self._fetch(())
        if not rows:
            return 0
        await self._publish(rows)
        await self._mark(rows)
        return len(rows)

    # -- settle mode ----------------------------------------------------------

    def _on_settled(self, events: list[Event]) -> None:
        # Called by the stream inside its consumer tasks: record only, no I/O.
        handed = self._handed
        settled = [seq for e in events if (seq := handed.pop(e.id, None)) is not None]
        if settled:
            self._settled.extend(settled)
            if self._flush is None:
                # Marks ride on the passes that commits trigger anyway; this
                # deferred wake only flushes them when no commit comes. A wake
                # per settlement made an UPDATE per event on a busy shard.
                self._flush = asyncio.get_running_loop().call_later(
                    self.settle_flush_s, self._flush_now
                )

    def _flush_now(self) -> None:
        self._flush = None
        self._wake.set()

    @property
    def unsettled(self) -> int:
        """Rows handed to a non-durable stream that its consumers have not finished."""
        return len(self._handed)

    async def mark_settled(self) -> int:
        """Mark the rows the stream reported settled as published; return how many."""
        total = 0
        while self._settled:
            chunk = self._settled[: self.batch_size]
            await self._mark_seqs(chunk)
            del self._settled[: len(chunk)]  # only once committed: a failure retries them
            total += len(chunk)
        return total

    async def _rows_of(self, conn: Any, seqs: list[int]) -> list[Record]:
        padded = _padded(seqs)
        marks = ", ".join(f"${i}" for i in range(1, len(padded) + 1))
        return list(
            await conn.fetch(
                f"{ROW} WHERE published_at IS NULL AND seq IN ({marks}) ORDER BY seq", *padded
            )
        )

    async def _hand_over(self, limit: int) -> int:
        """Hand up to `limit` rows this process has not handed yet to the stream."""
        room = min(limit, self.max_unsettled - len(self._handed))
        if room <= 0:
            return 0
        handed = self._handed
        seqs = {*handed.values(), *self._settled}
        async with self.db.shard(self.shard) as conn:
            # Rows already handed are still unpublished: read past them. With
            # many handed (consumers behind), past their seqs alone (the
            # partial index), not their payloads.
            if len(seqs) <= self.batch_size:
                rows = list(await conn.fetch(PENDING, room + len(seqs)))
            else:
                fresh = [
                    int(r[0])
                    for r in await conn.fetch(_PENDING_SEQS, room + len(seqs))
                    if int(r[0]) not in seqs
                ][:room]
                rows = await self._rows_of(conn, fresh) if fresh else []
            rows = [r for r in rows if int(r[0]) not in seqs][:room]
        if not rows:
            return 0
        # Recorded before publishing: a stream with no consumer group settles
        # an event inside publish().
        for r in rows:
            handed[r[1]] = int(r[0])
        try:
            await self._publish(rows)
        except BaseException:
            for r in rows:
                handed.pop(r[1], None)
            raise
        return len(rows)

    async def pump(self) -> int:
        """Publish batches back to back until the outbox has less than a batch; return the count.

        Database work overlaps the broker's acknowledgements: while batch k is
        being acknowledged, batch k-1 is marked and batch k+1 read (excluding
        the rows in flight). Batch k+1 is sent only after k is acknowledged, so
        the stream order is the same as `run_once`'s.
        """
        if self.settle_mode:
            total = 0
            while True:
                count = await self._hand_over(self.batch_size)
                total += count
                # After handing over: a write (on SQLite, behind the writers' lock)
                # must not delay the next events' way to their consumers.
                await self.mark_settled()
                if count < self.batch_size or not await self.hold_lease():
                    return total
        total = 0
        rows = await self._fetch(())
        acked: list[Record] = []  # published and acknowledged, not yet marked
        in_flight: asyncio.Task[None] | None = None
        try:
            while rows:
                in_flight = asyncio.create_task(self._publish(rows))
                if acked:
                    await self._mark(acked)
                    total += len(acked)
                full = len(rows) == self.batch_size
                ahead = await self._fetch([int(r[0]) for r in rows]) if full else []
                await in_flight
                in_flight = None
                acked, rows = rows, ahead
                if not await self.hold_lease():
                    break
            if acked:
                await self._mark(acked)
                total += len(acked)
        finally:
            if in_flight is not None:
                in_flight.cancel()
                await asyncio.gather(in_flight, return_exceptions=True)
        return total

    async def _fetch(self, exclude: Sequence[int]) -> list[Record]:
        async with self.db.shard(self.shard) as conn:
            if not exclude:
                return list(await conn.fetch(PENDING, self.batch_size))
            padded = _padded(exclude)
            marks = ", ".join(f"${i}" for i in range(2, len(padded) + 2))
            return list(
                await conn.fetch(
                    f"{ROW} WHERE published_at IS NULL AND seq NOT IN ({marks}) "
                    "ORDER BY seq LIMIT $1",
                    self.batch_size,
                    *padded,
                )
            )

    async def _publish(self, rows: Sequence[Record]) -> None:
        await self.backend.start()  # no-op when connected; reconnects after an outage
        by_topic: dict[str, list[Event]] = {}
        for row in rows:
            event = event_of_row(row)
            by_topic.setdefault(event.topic, []).append(event)
        for topic, batch in by_topic.items():
            spec = self.topics.get(topic) or self.topics.setdefault(topic, TopicSpec(topic))
            if topic not in self._ensured:
                await self.backend.ensure_topic(spec)
                self._ensured.add(topic)
            await self.backend.publish(spec, batch)

    async def _mark(self, rows: Sequence[Record]) -> None:
        await self._mark_seqs([int(r[0]) for r in rows])

    async def _mark_seqs(self, seqs: Sequence[int]) -> None:
        padded = _padded(seqs)
        marks = ", ".join(f"${i}" for i in range(2, len(padded) + 2))
        async with self.db.shard(self.shard) as conn:
            await conn.execute(
                f"UPDATE tenfold_outbox SET published_at = $1 WHERE seq IN ({marks})",
                self._clock(),
                *padded,
            )
        self.published += len(seqs)
        metrics.child(metrics.outbox_published, self.shard).inc(len(seqs))

    async def prune(self) -> int:
        """Delete published rows older than the retention; return how many."""
        async with self.db.shard(self.shard) as conn:
            return int(
                await conn.execute(
                    "DELETE FROM tenfold_outbox "
                    "WHERE published_at IS NOT NULL AND published_at < $1",
                    self._clock() - self.retention_s,
                )
            )

    async def pending(self) -> int:
        async with self.db.shard(self.shard) as conn:
            return int(
                await conn.fetchval(
                    "SELECT COUNT(*) FROM tenfold_outbox WHERE published_at IS NULL"
                )
                or 0
            )

    # -- the loop -----------------------------------------------------------

    async def run(self) -> None:
        """Relay until `stop()`; survives broker and shard outages with bounded backoff."""
        backoff = Backoff(0.1, self.max_backoff_s)
        passes = 0
        while not self._stopping.is_set():
            try:
                if self._settled:  # a standby still marks what it handed before
                    await self.mark_settled()
                if not await self.hold_lease():
                    # A standby: writes wake it after every commit, but it only has
                    # to try for the lease again when the holder's might lapse.
                    await self._sleep(min(1.0, self.lease_s / 3), wakeable=False)
                    continue
                await self._ensure_listener()
                count = await self.pump()
                backoff.reset()
                passes += 1
                if passes % 500 == 0:
                    await self.prune()
                if count < self.batch_size:
                    await self._sleep(self.poll_interval_s)
                    if count and self.linger_s:  # busy: let a few more rows commit
                        await asyncio.sleep(self.linger_s)
            except Exception as exc:  # the relay must outlive any one failure
                delay = backoff.next_s()
                log.warning("relay %s: %s; retrying in %.2fs", self.shard, exc, delay)
                metrics.relay_failures.labels(shard=self.shard).inc()
                await self._sleep(delay)
        await self._drop_listener()
        with contextlib.suppress(DataError):
            await self.mark_settled()
        with contextlib.suppress(DataError):
            await self.release_lease()  # so a standby takes over now, not after lease_s

    async def drain(self, timeout_s: float = 10.0) -> int:
        """Publish until the outbox is empty (for shutdown); return how many were published.

        In settle mode (a stream that dies with the process) only what the
        stream settles at once (topics without a consumer group) ends up
        marked; the rest stays unpublished, for the next start.
        """
        total = 0
        async with asyncio.timeout(timeout_s):
            while (count := await self.pump()) > 0:
                total += count
            if self.settle_mode:
                await self.mark_settled()
        return total

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def detach(self) -> None:
        """Stop listening to the stream's settlements (when the relay is discarded)."""
        if self.settle_mode:
            self.backend.off_settled(self._on_settled)
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    def wake(self) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float, *, wakeable: bool = True) -> None:
        try:
            async with asyncio.timeout(seconds):
                await (self._wake if wakeable else self._stopping).wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def _ensure_listener(self) -> None:
        # Postgres only: LISTEN on a connection held for the relay's lifetime.
        if self._listener is not None and not self._listener.alive():
            self._listener = None
        if self._listener is not None or not hasattr(self.db.pool(self.shard), "listen"):
            return
        try:
            self._listener = await self.db.pool(self.shard).listen(
                "tenfold_outbox", lambda *_: self._wake.set()
            )
        except DataError as exc:
            log.info("relay %s: LISTEN unavailable, polling only: %s", self.shard, exc)

    async def _drop_listener(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.close()
