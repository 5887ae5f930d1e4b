"""The embedded event path (`memory://`) keeps the outbox's guarantee through a crash.

The in-process stream dies with the process, so the relay marks an outbox row
published only once every consumer group finished its event. These tests kill
a bus without its shutdown (its tasks cancelled, nothing flushed: what SIGKILL
leaves), then start a fresh process's bus on the same shards and check that
every committed event is handled, each exactly once through the inbox.
(The multi-process SIGKILL version is tests/integration/test_chaos.py's
`test_embedded_kill_nodes_short`.)
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from tenfold.data.base import Connection
from tenfold.events.base import Event, RetryPolicy, StartPosition, TopicSpec
from tenfold.events.bus import EventBus
from tenfold.events.memory import MemoryStreams
from tenfold.events.outbox import emit
from tenfold.events.relay import OutboxRelay
from tests.integration.support import wait_until

LEDGER = (
    "CREATE TABLE IF NOT EXISTS ledger (slot INTEGER NOT NULL, event_id TEXT NOT NULL, "
    "k TEXT NOT NULL)"
)


async def _pending(db: Any) -> int:
    total = 0
    for shard in db.shard_names:
        async with db.shard(shard) as conn:
            total += int(
                await conn.fetchval(
                    "SELECT COUNT(*) FROM tenfold_outbox WHERE published_at IS NULL"
                )
            )
    return total


async def _ledger(db: Any) -> list[str]:
    ids: list[str] = []
    for shard in db.shard_names:
        async with db.shard(shard) as conn:
            ids += [r[0] for r in await conn.fetch("SELECT event_id FROM ledger")]
    return ids


def _bus(db: Any, gate: asyncio.Event | None = None) -> tuple[EventBus, MemoryStreams]:
    streams = MemoryStreams(handler_timeout_s=10.0)
    bus = EventBus(db, streams)
    bus.topic("shop.orders", partitions=4)

    @bus.consumer("shop.orders", group="ledger", shard_writes=True)
    async def book(event: Event, conn: Connection) -> None:
        await conn.insert("ledger", {"event_id": event.id, "k": event.key})

    if gate is not None:
        # Held before the inbox transaction opens: a held SQLite write would block emits.
        inner = bus.consumers[0].handler

        async def gated(delivery: Any) -> None:
            await gate.wait()
            await inner(delivery)

        bus.consumers[0] = dataclasses.replace(bus.consumers[0], handler=gated)
    return bus, streams


async def _crash(bus: EventBus) -> None:
    """What SIGKILL leaves: the bus's tasks end mid-work, no drain, no marks, no release."""
    for task in bus._tasks:
        task.cancel()
    await asyncio.gather(*bus._tasks, return_exceptions=True)
    for stop in bus._stops:
        await stop()  # cancels the in-process consumers (their transactions roll back)


async def _emit(db: Any, bus: EventBus, keys: list[str]) -> None:
    for key in keys:
        async with db.shard_for(key) as conn, conn.transaction():
            await bus.emit(conn, "shop.orders", key, {"k": key})


async def test_a_crash_before_consumers_finish_loses_nothing_and_doubles_nothing(make_db):
    db = await make_db(shards=2, relay_lease_s=0.5, relay_poll_interval_s=0.02)
    for shard in db.shard_names:
        async with db.shard(shard) as conn:
            await conn.execute(LEDGER)
    gate = asyncio.Event()
    first, _ = _bus(db, gate)
    await first.start()
    keys = [f"order{i}" for i in range(40)]
    await _emit(db, first, keys)
    # Everything is handed to the first process's stream, its consumers held at the gate.
    await wait_until(
        lambda: _handed(first) == len(keys), timeout_s=10, what="every row handed to the stream"
    )
    assert await _pending(db) == len(keys)  # handed is not published: nothing settled yet
    await _crash(first)
    assert await _pending(db) == len(keys)

    second, _ = _bus(db)
    await second.start()
    try:
        await wait_until(
            lambda: _settled(db, len(keys)), timeout_s=15, what="the second process handled all"
        )
        ids = await _ledger(db)
        assert len(ids) == len(keys) == len(set(ids))
    finally:
        await second.stop()


async def test_settled_events_are_not_handled_again_after_a_crash(make_db):
    db = await make_db(shards=1, relay_lease_s=0.5, relay_poll_interval_s=0.02)
    async with db.shard("s0") as conn:
        await conn.execute(LEDGER)
    first, _ = _bus(db)
    await first.start()
    await _emit(db, first, [f"a{i}" for i in range(20)])
    await wait_until(lambda: _settled(db, 20), timeout_s=10, what="the first 20 handled")
    await _crash(first)

    handled: list[str] = []
    second, _ = _bus(db)
    inner = second.consumers[0].handler

    async def counting(delivery: Any) -> None:
        handled.append(delivery.event.id)
        await inner(delivery)

    second.consumers[0] = dataclasses.replace(second.consumers[0], handler=counting)
    await second.start()
    try:
        await _emit(db, second, [f"b{i}" for i in range(5)])
        await wait_until(lambda: _settled(db, 25), timeout_s=10, what="the next 5 handled")
        assert len(handled) == 5  # the 20 marked before the crash are not delivered again
    finally:
        await second.stop()


def _handed(bus: EventBus) -> int:
    return sum(relay.unsettled for relay in bus.relays)


async def _settled(db: Any, n: int) -> bool:
    return await _pending(db) == 0 and len(await _ledger(db)) == n


async def test_an_unconsumed_topic_is_marked_at_publish_and_a_slow_group_holds_rows(make_db):
    """No group: settled as stored. A group that has not finished: the row stays pending."""
    db = await make_db(shards=1)
    streams = MemoryStreams()
    quiet = TopicSpec("shop.audit", partitions=2)
    busy = TopicSpec("shop.orders", partitions=2)
    await streams.ensure_topic(quiet)
    await streams.ensure_topic(busy)
    gate = asyncio.Event()

    async def slow(_: Any) -> None:
        await gate.wait()

    stop = await streams.consume(busy, "slow", slow, _policy(), StartPosition())
    relay = OutboxRelay(db, "s0", streams, {quiet.name: quiet, busy.name: busy})
    try:
        async with db.shard("s0") as conn, conn.transaction():
            await emit(conn, quiet, "k1", {"a": 1})
            await emit(conn, busy, "k2", {"b": 2})
        assert await relay.run_once() == 2
        await relay.mark_settled()
        assert await _pending(db) == 1 and relay.unsettled == 1
        assert await relay.run_once() == 0  # the held row is not handed twice
        gate.set()
        await wait_until(lambda: relay.unsettled == 0, timeout_s=5, what="the slow group done")
        await relay.mark_settled()
        assert await _pending(db) == 0
    finally:
        await stop()
        relay.detach()


async def test_the_relay_stops_handing_rows_at_its_unsettled_bound(make_db):
    db = await make_db(shards=1)
    streams = MemoryStreams()
    spec = TopicSpec("shop.orders", partitions=1)
    await streams.ensure_topic(spec)
    gate = asyncio.Event()

    async def held(_: Any) -> None:
        await gate.wait()

    stop = await streams.consume(spec, "held", held, _policy(), StartPosition())
    relay = OutboxRelay(db, "s0", streams, {spec.name: spec}, batch_size=8, max_unsettled=10)
    try:
        async with db.shard("s0") as conn, conn.transaction():
            for i in range(30):
                await emit(conn, spec, f"k{i}", {"i": i})
        assert await relay.pump() == 10  # then it waits for consumers: memory stays bounded
        assert await relay.pump() == 0
        gate.set()
        handed = 10
        for _ in range(500):  # bounded: 5 s at most
            if not await _pending(db):
                break
            handed += await relay.pump()
            assert relay.unsettled <= 10
            await asyncio.sleep(0.01)
        assert await _pending(db) == 0
        assert handed == 30  # each row handed once, however the passes interleaved
    finally:
        gate.set()
        await stop()
        relay.detach()


def _policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
