"""The transactional outbox and its relay, on SQLite and PostgreSQL.

`emit` writes in the caller's transaction (all or nothing); the relay
publishes every committed row at least once and, with two relays racing, at
most twice; it survives a broker outage; Postgres wakes it with NOTIFY;
`EventBus` ties it together with exactly-once effects through the inbox.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from tenfold.errors import EventError, PayloadError
from tenfold.events.base import Delivery, Event, RetryPolicy, StartPosition, TopicSpec
from tenfold.events.bus import EventBus
from tenfold.events.memory import MemoryStreams
from tenfold.events.outbox import emit, event_of_row, key_text
from tenfold.events.relay import OutboxRelay
from tenfold.keyspace import slot_of
from tests.integration.support import FakeClock, wait_until

ORDERS = "CREATE TABLE orders (slot INTEGER NOT NULL, id TEXT PRIMARY KEY, event_id TEXT NOT NULL)"


class RecordingStreams(MemoryStreams):
    """MemoryStreams that counts every event id handed to `publish` (duplicates too)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.delay_s = delay_s

    async def publish(self, spec: TopicSpec, events: list[Event]) -> None:
        for event in events:
            self.calls[event.id] += 1
        if self.delay_s:
            await asyncio.sleep(random.uniform(0, self.delay_s))
        await super().publish(spec, events)


class _Rollback(Exception):
    pass


def new_topic(**options: Any) -> TopicSpec:
    return TopicSpec(f"t{uuid.uuid4().hex[:10]}.orders", **options)


async def create_orders(db: Any) -> None:
    for name in db.shard_names:
        async with db.shard(name) as conn:
            await conn.execute(ORDERS)


async def place_order(db: Any, spec: TopicSpec, key: str, payload: Any = None) -> str:
    """Insert an order and emit its event in one transaction; return the event id."""
    async with db.shard_for(key) as conn, conn.transaction():
        event_id = await emit(conn, spec, key, payload if payload is not None else {"order": key})
        await conn.insert("orders", {"id": key, "event_id": event_id})
    return event_id


async def outbox_rows(db: Any, shard: str = "s0") -> list[Any]:
    async with db.shard(shard) as conn:
        return await conn.fetch(
            "SELECT seq, event_id, topic, event_key, slot, payload, headers, created_at, "
            "published_at FROM tenfold_outbox ORDER BY seq"
        )


async def count(db: Any, table: str, shard: str = "s0") -> int:
    async with db.shard(shard) as conn:
        return int(await conn.fetchval(f"SELECT COUNT(*) FROM {table}"))


# -- emit -------------------------------------------------------------------------------


async def test_emit_outside_a_transaction_is_refused(make_db):
    db = await make_db(shards=1)
    spec = new_topic()
    async with db.shard_for("k") as conn:
        with pytest.raises(EventError, match="transaction"):
            await emit(conn, spec, "k", {"a": 1})
    assert await count(db, "tenfold_outbox") == 0


@pytest.mark.parametrize(
    "payload",
    [{"when": object()}, {"blob": "x" * 2000}],
    ids=["unserialisable", "too-large"],
)
async def test_a_bad_payload_fails_and_rolls_back_the_callers_write(make_db, payload):
    db = await make_db(shards=1)
    await create_orders(db)
    spec = new_topic(max_event_bytes=1024)
    with pytest.raises(PayloadError, match=spec.name):
        async with db.shard_for("o1") as conn, conn.transaction():
            await conn.insert("orders", {"id": "o1", "event_id": "-"})
            await emit(conn, spec, "o1", payload)
    assert await count(db, "orders") == 0
    assert await count(db, "tenfold_outbox") == 0


@pytest.mark.parametrize(
    "headers",
    [{"n": 1}, {"bad name": "x"}, {"a:b": "x"}, {"": "x"}, {"trace": "a\r\nInjected: y"}],
    ids=["int-value", "space", "colon", "empty", "crlf"],
)
async def test_headers_the_broker_would_refuse_fail_the_callers_write(make_db, headers):
    # Found by the relay instead, such a row would stall the shard's outbox (NATS refuses
    # the name) or kill the relay task (a non-str value raises AttributeError in nats-py).
    db = await make_db(shards=1)
    await create_orders(db)
    spec = new_topic()
    with pytest.raises(PayloadError, match="header"):
        async with db.shard_for("o1") as conn, conn.transaction():
            await conn.insert("orders", {"id": "o1", "event_id": "-"})
            await emit(conn, spec, "o1", {"a": 1}, headers)
    assert await count(db, "orders") == 0
    assert await count(db, "tenfold_outbox") == 0


async def test_the_size_limit_counts_payload_and_headers(make_db):
    db = await make_db(shards=1)
    spec = new_topic(max_event_bytes=1024)
    exact = b"x" * 1024
    async with db.shard_for("k") as conn, conn.transaction():
        await emit(conn, spec, "k", exact)
    with pytest.raises(PayloadError, match="1025 bytes"):
        async with db.shard_for("k") as conn, conn.transaction():
            await emit(conn, spec, "k", exact + b"y")
    headers = {"trace": "t" * 10}
    with pytest.raises(PayloadError):
        async with db.shard_for("k") as conn, conn.transaction():
            await emit(conn, spec, "k", exact, headers)
    assert await count(db, "tenfold_outbox") == 1


async def test_emit_commits_with_the_state_change(make_db):
    db = await make_db(shards=1)
    await create_orders(db)
    spec = new_topic()
    async with db.shard_for("o7") as conn, conn.transaction():
        await conn.insert("orders", {"id": "o7", "event_id": "pending"})
        event_id = await emit(conn, spec, "o7", {"total": 12.5}, {"trace": "abc"})
        await conn.execute("UPDATE orders SET event_id = $1 WHERE id = $2", event_id, "o7")
    async with db.shard("s0") as conn:
        assert await conn.fetchval("SELECT event_id FROM orders WHERE id = 'o7'") == event_id
    rows = await outbox_rows(db)
    assert len(rows) == 1
    event = event_of_row(rows[0])
    assert (event.id, event.topic, event.key) == (event_id, spec.name, "o7")
    assert event.slot == slot_of("o7")
    assert event.data() == {"total": 12.5}
    assert dict(event.headers) == {"trace": "abc"}
    assert rows[0]["published_at"] is None
    assert key_text(b"\x01\xff") == "01ff"


async def test_a_rolled_back_emit_leaves_nothing_and_is_never_published(make_db):
    db = await make_db(shards=1)
    await create_orders(db)
    spec = new_topic(partitions=2)
    with pytest.raises(_Rollback):
        async with db.shard_for("gone") as conn, conn.transaction():
            await emit(conn, spec, "gone", {"x": 1})
            await conn.insert("orders", {"id": "gone", "event_id": "-"})
            raise _Rollback
    kept = await place_order(db, spec, "kept")
    assert [r["event_id"] for r in await outbox_rows(db)] == [kept]
    streams = RecordingStreams()
    relay = OutboxRelay(db, "s0", streams, {spec.name: spec})
    assert await relay.run_once() == 1
    assert await relay.run_once() == 0
    assert set(streams.calls) == {kept}
    assert (await streams.topic_status(spec)).messages == 1
    assert await relay.pending() == 0
    assert all(r["published_at"] is not None for r in await outbox_rows(db))


# -- the relay never skips a committed row ------------------------------------------------


@dataclass
class Workload:
    committed: set[str] = field(default_factory=set)
    rolled_back: set[str] = field(default_factory=set)
    naive_seen: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)
    by_relay: list[int] = field(default_factory=list)

    @property
    def naive_lost(self) -> set[str]:
        return self.committed - self.naive_seen


async def run_workload(
    db: Any, *, mode: str, writers: int, rounds: int, max_sleep_s: float
) -> Workload:
    """`writers` tasks emit, sleep, then commit (or roll back) while two relays race."""
    spec = new_topic(partitions=4)
    out = Workload()
    streams = RecordingStreams(delay_s=0.03 if mode == "lease" else 0.003)
    await streams.ensure_topic(spec)
    topics = {spec.name: spec}
    relays = [
        OutboxRelay(db, "s0", streams, topics, batch_size=32, poll_interval_s=0.005, lease_s=0.02)
        for _ in range(2)
    ]
    writing = asyncio.Event()
    writing.set()

    async def writer(w: int) -> None:
        for r in range(rounds):
            key = f"{spec.name}-w{w}-r{r}"
            event_id = ""
            try:
                async with db.shard_for(key) as conn, conn.transaction():
                    event_id = await emit(conn, spec, key, {"w": w, "r": r})
                    await conn.insert("orders", {"id": key, "event_id": event_id})
                    await asyncio.sleep(random.uniform(0, max_sleep_s))
                    # A fifth roll back; writer 0's first round always does, so
                    # every run has rolled-back rows to check.
                    if random.random() < 0.2 or (w == 0 and r == 0):
                        raise _Rollback
            except _Rollback:
                out.rolled_back.add(event_id)
                continue
            out.committed.add(event_id)

    cursor = 0

    async def naive_poll() -> None:
        nonlocal cursor
        async with db.shard("s0") as conn:
            rows = await conn.fetch(
                "SELECT seq, event_id FROM tenfold_outbox WHERE seq > $1 AND topic = $2 "
                "ORDER BY seq",
                cursor,
                spec.name,
            )
        for row in rows:
            out.naive_seen.add(row[1])
            cursor = max(cursor, int(row[0]))

    async def naive_reader() -> None:
        # What a relay reading `seq > last_seen` would publish.
        while writing.is_set():
            await naive_poll()
            await asyncio.sleep(0.001)
        await naive_poll()

    async def pump(relay: OutboxRelay) -> None:
        # Bypass the lease: both relays publish at the same time.
        while writing.is_set():
            if await relay.run_once() == 0:
                await asyncio.sleep(0.001)

    if mode == "run_once":
        relay_tasks = [asyncio.create_task(pump(r)) for r in relays]
    else:
        relay_tasks = [asyncio.create_task(r.run()) for r in relays]
    reader = asyncio.create_task(naive_reader())
    try:
        await asyncio.gather(*(writer(w) for w in range(writers)))
        if mode == "lease":
            await wait_until(lambda: _pending_is(relays[0], 0), 30, "the relays to drain")
    finally:
        writing.clear()
        for relay in relays:
            relay.stop()
        results = await asyncio.gather(*relay_tasks, reader, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results
    if mode == "run_once":
        await relays[0].drain()
    out.calls = streams.calls
    out.by_relay = [r.published for r in relays]

    # What was published is exactly what committed: nothing lost, nothing rolled back.
    published = set(streams.calls)
    assert published == out.committed, (
        f"lost {len(out.committed - published)}, extra {len(published - out.committed)}"
    )
    assert not published & out.rolled_back
    assert all(1 <= streams.calls[i] <= 2 for i in out.committed), max(streams.calls.values())
    assert (await streams.topic_status(spec)).messages == len(out.committed)
    assert await relays[0].pending() == 0
    async with db.shard("s0") as conn:
        rows = await conn.fetch(
            "SELECT event_id, published_at FROM tenfold_outbox WHERE topic = $1", spec.name
        )
        orders = await conn.fetch("SELECT event_id FROM orders WHERE id LIKE $1", f"{spec.name}-%")
    assert {r[0] for r in rows} == out.committed
    assert all(r[1] is not None for r in rows)
    assert {r[0] for r in orders} == out.committed
    return out


@pytest.mark.parametrize("mode", ["run_once", "lease"])
async def test_the_relay_never_skips_a_committed_row(make_db, backend, mode):
    """Ids are allocated before commit and commit out of order; the relay loses none.

    64 writers emit, sleep 0..50 ms, then commit (a fifth roll back), while two
    relays publish the same shard: bypassing the lease (`run_once` in a tight
    loop on both) or through it with a lease shorter than a publish. The
    published set equals the committed set and each row is published once or
    twice. A `seq > last_seen` reader polling the same outbox loses rows (on
    SQLite writers serialise, so commits come in seq order and it cannot).
    """
    postgres = backend == "postgres"
    writers = 64 if postgres else 8
    # Every writer holds a transaction at once, on purpose: the shard's bulkhead admits them all.
    db = await make_db(shards=1, pool_max_size=writers + 8, shard_max_concurrent=writers + 8)
    await create_orders(db)
    lost: list[int] = []
    for attempt in range(3):
        run = await run_workload(
            db, mode=mode, writers=writers, rounds=3, max_sleep_s=0.05 * (attempt + 1)
        )
        assert len(run.committed) > writers  # the workload did commit (and roll back) rows
        assert run.rolled_back
        if mode == "run_once":
            assert all(n > 0 for n in run.by_relay), f"one relay never published: {run.by_relay}"
        lost.append(len(run.naive_lost))
        if not postgres:
            # SQLite: BEGIN IMMEDIATE serialises writers, so seq order is commit order.
            assert run.naive_lost == set()
            break
        if run.naive_lost:
            break
    if postgres:
        assert lost[-1] > 0, f"the naive seq > last_seen reader never lost a row: {lost}"


# -- the lease --------------------------------------------------------------------------------


async def test_one_relay_holds_the_lease_until_it_releases_or_expires(make_db):
    db = await make_db(shards=1)
    clock = FakeClock()
    streams = MemoryStreams()
    a = OutboxRelay(db, "s0", streams, {}, lease_s=10.0, clock=clock)
    b = OutboxRelay(db, "s0", streams, {}, lease_s=10.0, clock=clock)
    assert await a.hold_lease() is True
    assert await b.hold_lease() is False
    clock.now += 5  # renewal by the holder
    assert await a.hold_lease() is True
    assert await b.hold_lease() is False
    clock.now += 8  # past the first grant, but a renewed: still a's
    assert await b.hold_lease() is False
    assert await a.hold_lease() is True

    await a.release_lease()
    assert await b.hold_lease() is True
    assert await a.hold_lease() is False

    clock.now += 10.5  # b stopped renewing: its lease expires
    assert await a.hold_lease() is True
    assert await b.hold_lease() is False
    async with db.shard("s0") as conn:
        rows = await conn.fetch("SELECT owner FROM tenfold_relay_lease")
    assert [r[0] for r in rows] == [a.owner]


async def test_only_the_lease_holder_relays_and_the_other_takes_over(make_db):
    db = await make_db(shards=1)
    await create_orders(db)
    spec = new_topic(partitions=2)
    streams = RecordingStreams()
    await streams.ensure_topic(spec)
    relays = [
        OutboxRelay(db, "s0", streams, {spec.name: spec}, poll_interval_s=0.02, lease_s=1.5)
        for _ in range(2)
    ]
    tasks = {id(r): asyncio.create_task(r.run()) for r in relays}
    try:
        first = [await place_order(db, spec, f"a{i}") for i in range(20)]
        await wait_until(lambda: set(first) <= set(streams.calls), 10, "the first batch")
        await wait_until(lambda: _pending_is(relays[0], 0), 5, "the first batch marked")
        await asyncio.sleep(0.2)
        active = [r for r in relays if r.published]
        assert len(active) == 1, [r.published for r in relays]
        holder = active[0]
        other = next(r for r in relays if r is not holder)
        holder.stop()
        await tasks.pop(id(holder))
        await holder.release_lease()
        second = [await place_order(db, spec, f"b{i}") for i in range(20)]
        await wait_until(lambda: set(second) <= set(streams.calls), 5, "the takeover")
        # Rows are marked (and counted) just after the broker acknowledged them.
        await wait_until(lambda: other.published == 20, 5, "the takeover to mark its rows")
        assert holder.published == 20
    finally:
        for relay in relays:
            relay.stop()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert set(streams.calls) == set(first) | set(second)


async def test_a_standby_is_not_woken_into_lease_attempts_by_writes(make_db):
    db = await make_db(shards=1)
    spec = new_topic(partitions=1)
    streams = RecordingStreams()
    holder = OutboxRelay(db, "s0", streams, {spec.name: spec}, lease_s=3.0)
    standby = OutboxRelay(db, "s0", streams, {spec.name: spec}, lease_s=3.0)
    assert await holder.hold_lease() is True
    attempts = 0
    take = standby.hold_lease

    async def counted() -> bool:
        nonlocal attempts
        attempts += 1
        return await take()

    standby.hold_lease = counted  # type: ignore[method-assign]
    task = asyncio.create_task(standby.run())
    try:
        await wait_until(lambda: attempts == 1, 5, "the standby's first try")
        for _ in range(50):  # an EventBus wakes its relay after every commit
            standby.wake()
            await asyncio.sleep(0.005)
        # one more try per lease_s / 3 = 1 s at most, not one per write
        assert attempts == 1
    finally:
        standby.stop()
        await asyncio.wait_for(task, 5)


# -- a broker outage --------------------------------------------------------------------------


async def test_the_relay_outlives_a_broker_outage_and_drains_after(make_db, nats_server):
    from tenfold.events.nats import NatsStreams

    db = await make_db(shards=1)
    await create_orders(db)
    spec = new_topic(partitions=4)
    streams = NatsStreams(nats_server.url, connect_timeout_s=1.0, publish_timeout_s=1.0)
    await streams.start()
    relay = OutboxRelay(
        db, "s0", streams, {spec.name: spec}, poll_interval_s=0.05, max_backoff_s=0.5
    )
    task: asyncio.Task[None] | None = None
    try:
        await streams.ensure_topic(spec)
        nats_server.kill()
        ids = []
        for start in range(0, 200, 20):
            async with db.shard("s0") as conn, conn.transaction():
                for i in range(start, start + 20):
                    ids.append(await emit(conn, spec, f"k{i}", {"i": i}))
        assert await relay.pending() == 200
        task = asyncio.create_task(relay.run())
        await asyncio.sleep(2.5)
        assert not task.done(), "the relay died while the broker was down"
        assert await relay.pending() == 200
        assert relay.published == 0

        nats_server.start()
        await wait_until(lambda: _pending_is(relay, 0), 15, "the outbox to drain")
        await wait_until(lambda: _messages(streams, spec, 200), 5, "200 events in the stream")
        assert not task.done()
        status = await streams.topic_status(spec)
        assert status.messages == 200  # re-sent batches were de-duplicated
    finally:
        relay.stop()
        if task is not None:
            await asyncio.wait_for(task, 10)  # ends cleanly, never raised
        await streams.close()


async def _pending_is(relay: OutboxRelay, n: int) -> bool:
    return await relay.pending() == n


async def _messages(streams: Any, spec: TopicSpec, n: int) -> bool:
    try:
        return (await streams.topic_status(spec)).messages == n
    except EventError:
        return False


# -- Postgres NOTIFY ------------------------------------------------------------------------


async def test_postgres_notify_wakes_the_relay(make_db, backend):
    if backend != "postgres":
        pytest.skip("LISTEN/NOTIFY is Postgres only")
    db = await make_db(shards=1)
    await create_orders(db)
    spec = new_topic(partitions=2)
    streams = RecordingStreams()
    relay = OutboxRelay(db, "s0", streams, {spec.name: spec}, poll_interval_s=10.0)
    await place_order(db, spec, "first")
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(lambda: relay.published == 1, 5, "the first event")
        await asyncio.sleep(0.3)  # the relay now sleeps for its 10 s poll interval
        start = time.monotonic()
        second = await place_order(db, spec, "second")
        await wait_until(lambda: second in streams.calls, 5, "the notified event")
        assert time.monotonic() - start < 1.0
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)


# -- EventBus end to end --------------------------------------------------------------------


async def create_ledger(db: Any) -> None:
    for name in db.shard_names:
        async with db.shard(name) as conn:
            await conn.execute(
                # No unique key on purpose: only the inbox can keep an effect single.
                "CREATE TABLE ledger (slot INTEGER NOT NULL, event_id TEXT NOT NULL, "
                "amount INTEGER NOT NULL)"
            )


async def total(db: Any, sql: str, *args: Any) -> int:
    n = 0
    for name in db.shard_names:
        async with db.shard(name) as conn:
            n += int(await conn.fetchval(sql, *args))
    return n


async def test_bus_applies_effects_exactly_once(make_db):
    db = await make_db(
        shards=2,
        consumer_initial_backoff_s=0.01,
        consumer_max_backoff_s=0.05,
        relay_poll_interval_s=0.02,
    )
    await create_orders(db)
    await create_ledger(db)
    streams = MemoryStreams()
    bus = EventBus(db, streams)
    spec = bus.topic("shop.orders", partitions=4)
    failed_once: set[str] = set()

    @bus.consumer("shop.orders", group="ledger", shard_writes=True)
    async def book(event: Event, conn: Any) -> None:
        await conn.insert("ledger", {"event_id": event.id, "amount": event.data()["amount"]})
        if event.key == "k3" and event.id not in failed_once:
            failed_once.add(event.id)
            raise RuntimeError("crash after the effect: the transaction must roll back")

    await bus.start()
    try:
        ids = []
        for i in range(12):
            key = f"k{i}"
            async with db.shard_for(key) as conn, conn.transaction():
                await conn.insert("orders", {"id": key, "event_id": "-"})
                ids.append(await bus.emit(conn, "shop.orders", key, {"amount": i}))
        await wait_until(lambda: _totals_are(db, 12), 10, "every effect applied")
        assert failed_once  # the failing attempt happened and was retried

        # A redelivery (the same delivery handed to the handler again) changes nothing.
        handler = bus.consumers[0].handler
        event = Event(ids[0], spec.name, "k0", slot_of("k0"), orjson.dumps({"amount": 0}), 0.0)
        await handler(Delivery(event, 1, spec.partition_of(event.slot), 1))
        await handler(Delivery(event, 2, spec.partition_of(event.slot), 1))
        # So does replaying the whole topic to the group.
        await streams.reset_group(spec, "ledger", StartPosition())
        await wait_until(lambda: _lag_zero(streams, spec), 10, "the replay")
        assert await total(db, "SELECT COUNT(*) FROM ledger") == 12
        assert await total(db, "SELECT COALESCE(SUM(amount), 0) FROM ledger") == sum(range(12))
        assert (
            await total(
                db, "SELECT COUNT(*) FROM tenfold_inbox WHERE consumer_group = $1", "ledger"
            )
            == 12
        )
        # Each effect and its inbox row live on the shard that owns the event's key.
        for i, event_id in enumerate(ids):
            async with db.shard_for(f"k{i}") as conn:
                assert (
                    await conn.fetchval("SELECT COUNT(*) FROM ledger WHERE event_id = $1", event_id)
                    == 1
                )
                assert (
                    await conn.fetchval(
                        "SELECT COUNT(*) FROM tenfold_inbox WHERE event_id = $1", event_id
                    )
                    == 1
                )
    finally:
        await bus.stop()


async def _totals_are(db: Any, n: int) -> bool:
    return await total(db, "SELECT COUNT(*) FROM ledger") == n


async def _lag_zero(streams: MemoryStreams, spec: TopicSpec) -> bool:
    status = await streams.group_status(spec, "ledger")
    return status.lag == 0 and status.in_flight == 0


async def test_bus_stop_drains_the_outbox(make_db):
    db = await make_db(shards=2, relay_batch_size=16, relay_poll_interval_s=5.0)
    streams = MemoryStreams()
    bus = EventBus(db, streams)
    spec = bus.topic("shop.audit", partitions=2)
    await bus.start()
    keys = [f"user{i}" for i in range(200)]
    for shard in db.shard_names:
        async with db.shard(shard) as conn, conn.transaction():
            for key in keys:
                if db.shard_name_for(key) == shard:
                    await bus.emit(conn, "shop.audit", key, {"k": key})
    await bus.stop()
    assert (await streams.topic_status(spec)).messages == 200
    for shard in db.shard_names:
        async with db.shard(shard) as conn:
            assert (
                await conn.fetchval(
                    "SELECT COUNT(*) FROM tenfold_outbox WHERE published_at IS NULL"
                )
                == 0
            )
            assert await conn.fetchval("SELECT COUNT(*) FROM tenfold_relay_lease") == 0


async def test_bus_retry_policy_dead_letters_through_the_bus(make_db):
    db = await make_db(shards=1, relay_poll_interval_s=0.02)
    streams = MemoryStreams()
    bus = EventBus(db, streams)
    spec = bus.topic("shop.refunds", partitions=2)
    seen: list[int] = []

    @bus.consumer("shop.refunds", group="refunder", retry=RetryPolicy(2, 0.01, 0.02))
    async def refund(delivery: Delivery) -> None:
        seen.append(delivery.attempt)
        raise RuntimeError("bank says no")

    await bus.start()
    try:
        async with db.shard("s0") as conn, conn.transaction():
            event_id = await bus.emit(conn, "shop.refunds", "r1", {"amount": 5})
        await wait_until(lambda: _dlq(streams, spec), 10, "the dead letter")
        letters = await streams.dead_letters(spec)
        assert [(d.event.id, d.attempts, d.group) for d in letters] == [(event_id, 2, "refunder")]
        assert "bank says no" in letters[0].error
        assert seen == [1, 2]
    finally:
        await bus.stop()


async def _dlq(streams: MemoryStreams, spec: TopicSpec) -> bool:
    return bool(await streams.dead_letters(spec))


async def test_insert_and_emit_writes_both_in_one_step_and_is_published(make_db):
    db = await make_db(shards=1, relay_poll_interval_s=5.0)  # only the wake-up publishes fast
    await create_orders(db)
    streams = RecordingStreams()
    bus = EventBus(db, streams)
    spec = bus.topic("shop.placed")
    await bus.start()
    try:
        async with db.shard_for("o1") as conn:  # no transaction open: atomic by itself
            event_id = await bus.insert_and_emit(
                conn, "orders", {"id": "o1", "event_id": "e1"}, "shop.placed", "o1", {"n": 1}
            )
        with pytest.raises(PayloadError):  # a bad event: the row is not written either
            async with db.shard_for("o2") as conn:
                await bus.insert_and_emit(
                    conn, "orders", {"id": "o2", "event_id": "e2"}, "shop.placed", "o2", {1j}
                )
        await wait_until(lambda: streams.calls[event_id] == 1, timeout_s=3)
        async with db.shard_for("o1") as conn:
            assert [r["id"] for r in await conn.fetch("SELECT id FROM orders")] == ["o1"]
            row = await conn.fetchrow(
                "SELECT topic, event_key, slot FROM tenfold_outbox WHERE event_id = $1", event_id
            )
        assert (row["topic"], row["event_key"], row["slot"]) == ("shop.placed", "o1", slot_of("o1"))
        assert (await streams.topic_status(spec)).messages == 1
    finally:
        await bus.stop()


async def test_a_busy_relay_lingers_to_batch_but_an_idle_one_publishes_at_once(make_db):
    # A linger far above the scheduling noise of a loaded 2-core box (0.05 s was not):
    # an idle outbox's first row must come well before it, a steady stream in its batches.
    db = await make_db(shards=1, relay_poll_interval_s=5.0, relay_linger_s=0.4)
    await create_orders(db)
    streams = RecordingStreams()
    batches: list[int] = []
    publish = streams.publish

    async def counting(spec: TopicSpec, events: list[Event]) -> None:
        batches.append(len(events))
        await publish(spec, events)

    streams.publish = counting  # type: ignore[method-assign]
    bus = EventBus(db, streams)
    bus.topic("shop.placed")
    await bus.start()
    try:
        started = time.monotonic()
        async with db.shard_for("first") as conn:
            await bus.insert_and_emit(
                conn, "orders", {"id": "first", "event_id": "e"}, "shop.placed", "first", {}
            )
        await wait_until(lambda: len(batches) == 1, timeout_s=3)
        assert time.monotonic() - started < 0.3  # the idle outbox's first row: no linger
        for i in range(40):  # then a steady stream, a row every 2 ms
            async with db.shard_for(f"o{i}") as conn:
                await bus.insert_and_emit(
                    conn, "orders", {"id": f"o{i}", "event_id": "e"}, "shop.placed", f"o{i}", {}
                )
            await asyncio.sleep(0.002)
        await wait_until(lambda: sum(batches) == 41, timeout_s=5)
    finally:
        await bus.stop()
    assert len(batches) <= 6, batches  # ~100+ ms of rows in passes 400 ms apart, not 40 passes
