"""`EventBus`: declare topics, emit in shard transactions, relay, consume.

bus = EventBus(db)                         # backend from TENFOLD_EVENTS_URL
bus.topic("chat.messages", partitions=16)
async with db.shard_for(room) as conn, conn.transaction():
    await conn.insert("messages", {...})
    await bus.emit(conn, "chat.messages", room, {"text": "hi"})

@bus.consumer("chat.messages", group="fanout")
async def fan_out(delivery): ...

@bus.consumer("wallet.debited", group="credit", shard_writes=True)
async def credit(event, conn): ...        # runs once per event id, in conn's transaction

await bus.start()   # relays (one per shard) + consumers
await bus.stop()    # stop consumers, drain the outbox, stop relays
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenfold.data.base import Connection, Insert
from tenfold.errors import BrokerUnavailable, TenfoldError, TopicError
from tenfold.events import outbox
from tenfold.events.base import (
    Delivery,
    Event,
    Handler,
    RetryPolicy,
    StartPosition,
    StreamBackend,
    TopicSpec,
    backend_from_url,
    check_group_name,
)
from tenfold.events.relay import OutboxRelay
from tenfold.keyspace import Key
from tenfold.observe import metrics, tracing
from tenfold.resilience.backoff import Backoff

__all__ = ["ConsumerSpec", "EventBus"]

log = logging.getLogger("tenfold.events")

ShardHandler = Callable[[Event, Connection], Awaitable[None]]
_INBOX = (
    "INSERT INTO tenfold_inbox (consumer_group, event_id, slot, processed_at) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    topic: str
    group: str
    handler: Handler
    policy: RetryPolicy
    start: StartPosition


class EventBus:
    """The event log of one app process over a `ShardedDatabase`.

    Args:
        db: the open sharded database whose shards hold the outboxes.
        backend: a stream backend; by default made from `TENFOLD_EVENTS_URL`.
    """

    def __init__(self, db: Any, backend: StreamBackend | None = None) -> None:
        self.db = db
        s = db.settings
        self.settings = s
        self.backend = backend or backend_from_url(
            s.events_url,
            connect_timeout_s=s.events_connect_timeout_s,
            publish_timeout_s=s.events_publish_timeout_s,
            handler_timeout_s=s.handler_timeout_s,
        )
        self.default_policy = RetryPolicy(
            max_attempts=s.consumer_max_attempts,
            initial_backoff_s=s.consumer_initial_backoff_s,
            max_backoff_s=s.consumer_max_backoff_s,
        )
        self.topics: dict[str, TopicSpec] = {}
        self.consumers: list[ConsumerSpec] = []
        self.relays: list[OutboxRelay] = []
        self._relay_of: dict[str, OutboxRelay] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stops: list[Callable[[], Awaitable[None]]] = []
        self._started = False

    def topic(self, name: str, **options: Any) -> TopicSpec:
        """Declare a topic (idempotent); options are `TopicSpec` fields."""
        options.setdefault("partitions", self.settings.events_partitions)
        spec = TopicSpec(name, **options)
        known = self.topics.get(name)
        if known is not None and known != spec:
            raise TopicError(f"topic {name} is already declared differently: {known} vs {spec}")
        self.topics[name] = spec
        return spec

    def spec(self, name: str) -> TopicSpec:
        """The declared spec of `name`, declaring it with defaults if needed."""
        return self.topics.get(name) or self.topic(name)

    async def emit(
        self,
        conn: Connection,
        topic: str,
        key: Key,
        payload: Any,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Write an event to `conn`'s outbox in its open transaction; return the event id."""
        event_id = await outbox.emit(conn, self.spec(topic), key, payload, _traced(headers))
        self._written(conn, topic)
        return event_id

    async def insert_and_emit(
        self,
        conn: Connection,
        table: str,
        row: Mapping[str, Any],
        topic: str,
        key: Key,
        payload: Any,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Insert `row` into the sharded `table` and its event into the outbox, atomically.

        The common case of a write with one event: on PostgreSQL it is a single
        statement (one round trip, no BEGIN/COMMIT needed); elsewhere, or inside
        an open transaction, it joins or opens a transaction. Returns the event id.
        """
        event = outbox.outbox_row(self.spec(topic), key, payload, _traced(headers))
        await conn.insert_together(
            [Insert(table, row), Insert("tenfold_outbox", event, sharded=False)]
        )
        self._written(conn, topic)
        return str(event["event_id"])

    def _written(self, conn: Connection, topic: str) -> None:
        metrics.child(metrics.events_emitted, topic).inc()
        relay = self._relay_of.get(conn.shard)
        if relay is not None:
            # Without NOTIFY (SQLite) the local relay would only see the row at
            # its next poll: wake it when the transaction commits (now, outside one).
            conn.after_commit(relay.wake)

    def consumer(
        self,
        topic: str,
        *,
        group: str,
        retry: RetryPolicy | None = None,
        start: StartPosition | None = None,
        shard_writes: bool = False,
    ) -> Callable[[Any], Any]:
        """Decorator: run the handler for every event of `topic` in consumer group `group`.

        With `shard_writes=True` the handler is `async (event, conn)`: `conn` is a
        transaction on the shard that owns the event's key, in which the event id
        is recorded in the inbox first, so a redelivered event is skipped and its
        effects apply exactly once.
        """
        check_group_name(group)
        self.spec(topic)

        def register(fn: Any) -> Any:
            handler: Handler = self._exactly_once(group, fn) if shard_writes else fn
            self.consumers.append(
                ConsumerSpec(
                    topic, group, handler, retry or self.default_policy, start or StartPosition()
                )
            )
            return fn

        return register

    def _exactly_once(self, group: str, fn: ShardHandler) -> Handler:
        async def handle(delivery: Delivery) -> None:
            event = delivery.event
            async with self.db.shard_for_slot(event.slot) as conn, conn.transaction():
                fresh = await conn.execute(_INBOX, group, event.id, event.slot, time.time())
                if not fresh:
                    metrics.events_handled.labels(event.topic, group, "duplicate").inc()
                    return
                await fn(event, conn)

        return handle

    async def start(self, *, relays: bool = True, consumers: bool = True) -> None:
        """Start one relay per shard and every consumer.

        A broker that is down at start-up does not stop the app: emits commit to
        the outbox, relays back off until it answers, consumers attach when it does.
        """
        try:
            await self.backend.start()
            for spec in self.topics.values():
                await self.backend.ensure_topic(spec)
        except BrokerUnavailable as exc:
            log.warning("starting without the broker, will retry: %s", exc)
        if consumers and not self.backend.durable:
            # Groups take their positions before the first publish: an in-process
            # stream settles an event with no group at once, and the relay would
            # mark it published before anyone handled it.
            for c in self.consumers:
                await self._attach(c)
        if relays:
            for shard in self.db.shard_names:
                self._start_relay(shard)
            # A shard added at runtime (`tenfold shards add`, then a move onto
            # it) gets its relay when this process first sees it in a topology.
            self.db.on_slots_moved(self._relay_new_shards)
        if consumers and self.backend.durable:
            for c in self.consumers:
                self._tasks.append(asyncio.create_task(self._attach(c), name=f"consumer:{c.group}"))
        self._tasks.append(asyncio.create_task(self._metrics_loop(10.0), name="metrics"))
        self._started = True

    def _start_relay(self, shard: str) -> None:
        s = self.settings
        relay = OutboxRelay(
            self.db,
            shard,
            self.backend,
            self.topics,
            batch_size=s.relay_batch_size,
            poll_interval_s=s.relay_poll_interval_s,
            linger_s=s.relay_linger_s,
            lease_s=s.relay_lease_s,
            retention_s=s.outbox_retention_s,
        )
        self.relays.append(relay)
        self._relay_of[shard] = relay
        self._tasks.append(asyncio.create_task(relay.run(), name=f"relay:{shard}"))

    def _relay_new_shards(self, _moved: list[int]) -> None:
        if not self._started:
            return
        for shard in self.db.shard_names:
            if shard not in self._relay_of:
                log.info("shard %s joined the topology: starting its outbox relay", shard)
                self._start_relay(shard)

    async def _attach(self, c: ConsumerSpec) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self.backend.start()
                await self.backend.ensure_topic(self.topics[c.topic])
                self._stops.append(
                    await self.backend.consume(
                        self.topics[c.topic], c.group, c.handler, c.policy, c.start
                    )
                )
                return
            except BrokerUnavailable as exc:
                delay = backoff.next_s()
                log.warning(
                    "consumer %s/%s waiting for the broker (%s); retry in %.1fs",
                    c.topic,
                    c.group,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def refresh_metrics(self) -> None:
        """Update the lag, DLQ and outbox-backlog gauges from the broker and the shards."""
        for spec in self.topics.values():
            status = await self.backend.topic_status(spec)
            metrics.dlq_size.labels(spec.name).set(status.dlq_size)
            for c in self.consumers:
                if c.topic == spec.name:
                    lag = await self.backend.group_status(spec, c.group)
                    metrics.consumer_lag.labels(spec.name, c.group).set(lag.lag)
        for relay in self.relays:
            metrics.outbox_pending.labels(relay.shard).set(await relay.pending())

    async def _metrics_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh_metrics()
            except TenfoldError as exc:
                log.debug("metrics refresh failed: %s", exc)

    async def wait_attached(self, timeout_s: float = 10.0) -> None:
        """Wait until every consumer is attached to the broker (tests, start-up probes)."""
        async with asyncio.timeout(timeout_s):
            while len(self._stops) < len(self.consumers):  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.01)

    async def stop(self, *, drain_timeout_s: float = 5.0) -> None:
        """Stop consumers, publish what the outbox still holds, stop relays, disconnect."""
        for task in self._tasks:
            if not task.get_name().startswith("relay:"):  # relays stop below, after consumers
                task.cancel()
        for stop in self._stops:
            await stop()
        self._stops.clear()
        for relay in self.relays:
            relay.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for relay in self.relays:
            try:
                if await relay.hold_lease():
                    await relay.drain(drain_timeout_s)
                    await relay.release_lease()
            except Exception as exc:  # shutdown must finish; the rows stay pending
                log.warning("could not drain the outbox of %s: %s", relay.shard, exc)
            relay.detach()
        self.relays.clear()
        self._relay_of.clear()
        await self.backend.close()
        self._started = False

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _traced(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """`headers` plus the current trace context, so the trace continues in every consumer."""
    return tracing.inject(dict(headers or {})) if tracing.enabled() else headers
