"""The `StreamBackend` contract (see tenfold/events/base.py), run against every backend.

One suite, parametrised over the in-process `MemoryStreams` and JetStream
(`NatsStreams` on the session's pinned nats-server; skipped when NATS is
unavailable). Every test uses fresh topic names and deletes its NATS streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from tenfold.errors import TopicError
from tenfold.events.base import (
    Delivery,
    Event,
    Handler,
    RetryPolicy,
    StartPosition,
    StreamBackend,
    TopicSpec,
)
from tenfold.events.memory import MemoryStreams
from tenfold.events.outbox import new_event_id
from tenfold.keyspace import slot_of
from tests.integration.support import wait_until

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


class Streams:
    """A started backend plus the topics and consumers a test made (cleaned up after)."""

    def __init__(self, kind: str, backend: StreamBackend, url: str | None) -> None:
        self.kind = kind
        self.backend = backend
        self.url = url
        self.specs: list[TopicSpec] = []
        self.stops: list[Callable[[], Awaitable[None]]] = []

    async def topic(self, partitions: int = 4, **options: Any) -> TopicSpec:
        spec = TopicSpec(f"t{uuid.uuid4().hex[:12]}.events", partitions=partitions, **options)
        self.specs.append(spec)
        await self.backend.ensure_topic(spec)
        return spec

    async def consume(
        self,
        spec: TopicSpec,
        group: str,
        handler: Handler,
        policy: RetryPolicy = FAST,
        start: StartPosition | None = None,
    ) -> Callable[[], Awaitable[None]]:
        stop = await self.backend.consume(spec, group, handler, policy, start or StartPosition())
        self.stops.append(stop)

        async def stop_once() -> None:
            if stop in self.stops:
                self.stops.remove(stop)
                await stop()

        return stop_once

    async def cleanup(self) -> None:
        for stop in self.stops:
            with contextlib.suppress(Exception):
                await stop()
        await self.backend.close()
        if self.kind == "nats" and self.specs:
            import nats
            import nats.js.errors

            from tenfold.events.nats import dlq_stream_name, stream_name

            nc = await nats.connect(self.url, connect_timeout=3)
            try:
                js = nc.jetstream()
                for spec in self.specs:
                    for name in (stream_name(spec.name), dlq_stream_name(spec.name)):
                        with contextlib.suppress(nats.js.errors.NotFoundError):
                            await js.delete_stream(name)
            finally:
                await nc.close()


@pytest.fixture(params=["memory", "nats"])
async def streams(request: pytest.FixtureRequest) -> AsyncIterator[Streams]:
    url: str | None = None
    if request.param == "memory":
        backend: StreamBackend = MemoryStreams(handler_timeout_s=10.0)
    else:
        from tenfold.events.nats import NatsStreams

        url = request.getfixturevalue("nats_url")
        backend = NatsStreams(url, handler_timeout_s=10.0, fetch_wait_s=0.5)
    await backend.start()
    harness = Streams(request.param, backend, url)
    try:
        yield harness
    finally:
        await harness.cleanup()


def make_event(spec: TopicSpec, key: str, n: int, *, slot: int | None = None) -> Event:
    return Event(
        id=new_event_id(),
        topic=spec.name,
        key=key,
        slot=slot_of(key) if slot is None else slot,
        payload=orjson.dumps({"key": key, "n": n}),
        created_at=time.time(),
        headers={"origin": "test"},
    )


def on_partition(spec: TopicSpec, p: int, key: str, n: int) -> Event:
    """An event whose slot lands on partition `p` of `spec`."""
    return make_event(spec, key, n, slot=p)


# -- order and parallelism --------------------------------------------------------


async def test_per_key_order_is_kept_and_partitions_run_in_parallel(streams: Streams):
    spec = await streams.topic(partitions=4)
    keys = [f"user-{i}" for i in range(32)]
    per_key = 12
    seen: dict[str, list[int]] = defaultdict(list)
    busy: Counter[int] = Counter()
    overlap = {"partition": 0, "total": 0}
    now_busy = 0

    async def handler(d: Delivery) -> None:
        nonlocal now_busy
        busy[d.partition] += 1
        now_busy += 1
        overlap["partition"] = max(overlap["partition"], busy[d.partition])
        overlap["total"] = max(overlap["total"], now_busy)
        try:
            assert d.partition == spec.partition_of(d.event.slot)
            await asyncio.sleep(random.uniform(0, 0.003))
            body = d.event.data()
            assert body["key"] == d.event.key
            seen[body["key"]].append(body["n"])
        finally:
            busy[d.partition] -= 1
            now_busy -= 1

    await streams.consume(spec, "ordered", handler)
    events = [make_event(spec, k, n) for n in range(per_key) for k in keys]
    for start in range(0, len(events), 64):
        await streams.backend.publish(spec, events[start : start + 64])
    total = len(keys) * per_key
    await wait_until(lambda: sum(map(len, seen.values())) >= total, 30, "every event handled")
    assert {spec.partition_of(slot_of(k)) for k in keys} == set(range(4))
    for key in keys:
        assert seen[key] == list(range(per_key)), f"{key} handled out of order: {seen[key]}"
    assert overlap["partition"] == 1, "a partition had two events in flight"
    assert overlap["total"] > 1, "partitions never ran at the same time"


async def test_a_slow_partition_does_not_hold_the_others(streams: Streams):
    spec = await streams.topic(partitions=4)
    release = asyncio.Event()
    blocked = asyncio.Event()
    handled: list[tuple[int, int]] = []

    async def handler(d: Delivery) -> None:
        n = d.event.data()["n"]
        if d.partition == 0 and n == 0:
            blocked.set()
            await asyncio.wait_for(release.wait(), 8)
        handled.append((d.partition, n))

    await streams.consume(spec, "slowpoke", handler)
    await streams.backend.publish(spec, [on_partition(spec, 0, "p0", 0)])
    await asyncio.wait_for(blocked.wait(), 10)
    later = [on_partition(spec, p, f"p{p}", n) for n in range(1, 6) for p in range(4)]
    await streams.backend.publish(spec, later)
    others = {(p, n) for p in range(1, 4) for n in range(1, 6)}
    await wait_until(lambda: others <= set(handled), 10, "the other partitions to finish")
    # Partition 0 is still held by its first event: nothing after it ran.
    assert not release.is_set()
    assert [h for h in handled if h[0] == 0] == []
    release.set()
    await wait_until(lambda: len(handled) == 21, 10, "partition 0 to drain")
    assert [n for p, n in handled if p == 0] == [0, 1, 2, 3, 4, 5]


# -- de-duplication ------------------------------------------------------------------


async def test_a_republished_event_is_stored_and_handled_once(streams: Streams):
    spec = await streams.topic(partitions=2)
    event = on_partition(spec, 1, "dup", 0)
    await streams.backend.publish(spec, [event, event])
    await streams.backend.publish(spec, [event])
    status = await streams.backend.topic_status(spec)
    assert status.messages == 1
    assert status.last_sequence == 1
    seen: list[str] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.event.id)

    await streams.consume(spec, "dedup", handler)
    sentinel = on_partition(spec, 1, "dup", 1)  # same partition: handled after the duplicate
    await streams.backend.publish(spec, [event, sentinel])
    await wait_until(lambda: sentinel.id in seen, 10, "the sentinel")
    assert seen == [event.id, sentinel.id]
    assert (await streams.backend.topic_status(spec)).messages == 2


async def test_an_event_carries_its_fields_to_the_handler(streams: Streams):
    spec = await streams.topic(partitions=3)
    event = make_event(spec, "alice", 7)
    got: list[Delivery] = []

    async def handler(d: Delivery) -> None:
        got.append(d)

    await streams.consume(spec, "fields", handler)
    await streams.backend.publish(spec, [event])
    await wait_until(lambda: got, 10, "the delivery")
    d = got[0]
    assert (d.event.id, d.event.key, d.event.slot, d.event.payload) == (
        event.id,
        event.key,
        event.slot,
        event.payload,
    )
    assert d.event.topic == spec.name
    assert dict(d.event.headers) == {"origin": "test"}
    assert d.event.created_at == pytest.approx(event.created_at)
    assert d.attempt == 1
    assert d.partition == spec.partition_of(event.slot)
    assert d.sequence == 1


# -- failures, retries, dead letters ----------------------------------------------------


async def test_a_poison_event_is_dead_lettered_and_its_partition_moves_on(streams: Streams):
    spec = await streams.topic(partitions=2)
    poison = on_partition(spec, 0, "bad", 0)
    after = [on_partition(spec, 0, "good", n) for n in range(1, 4)]
    attempts: list[int] = []
    handled: list[str] = []
    log: list[str] = []

    async def handler(d: Delivery) -> None:
        if d.event.id == poison.id:
            attempts.append(d.attempt)
            log.append("poison")
            raise ValueError(f"cannot digest event {d.event.id}")
        handled.append(d.event.id)
        log.append("ok")

    # Backoff long enough that a partition which did not hold would run the others first.
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=0.2)
    await streams.consume(spec, "eater", handler, policy)
    await streams.backend.publish(spec, [poison, *after])
    await wait_until(lambda: len(handled) == 3, 15, "the events after the poison")
    assert handled == [e.id for e in after]
    assert attempts == [1, 2, 3]
    # The retried event held its partition: nothing after it ran before it was dead-lettered.
    assert log == ["poison"] * 3 + ["ok"] * 3
    letters = await streams.backend.dead_letters(spec)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.event.id == poison.id
    assert letter.event.payload == poison.payload
    assert letter.event.key == "bad"
    assert letter.attempts == 3
    assert letter.group == "eater"
    assert "ValueError" in letter.error and f"cannot digest event {poison.id}" in letter.error
    assert letter.failed_at == pytest.approx(time.time(), abs=30)
    assert (await streams.backend.topic_status(spec)).dlq_size == 1
    await wait_until(lambda: _lag_is(streams, spec, "eater", 0), 10, "the group to have no lag")


async def _lag_is(streams: Streams, spec: TopicSpec, group: str, lag: int) -> bool:
    return (await streams.backend.group_status(spec, group)).lag == lag


async def test_a_handler_that_fails_twice_then_succeeds_is_not_dead_lettered(streams: Streams):
    spec = await streams.topic(partitions=2)
    event = make_event(spec, "flaky", 0)
    attempts: list[int] = []
    done: list[str] = []

    async def handler(d: Delivery) -> None:
        attempts.append(d.attempt)
        if len(attempts) < 3:
            raise RuntimeError("transient")
        done.append(d.event.id)

    await streams.consume(spec, "flaky", handler, RetryPolicy(5, 0.01, 0.05))
    await streams.backend.publish(spec, [event])
    await wait_until(lambda: done, 10, "success")
    await asyncio.sleep(0.3)
    assert done == [event.id]
    assert attempts == [1, 2, 3]
    assert await streams.backend.dead_letters(spec) == []
    assert (await streams.backend.topic_status(spec)).dlq_size == 0


async def test_drop_and_replay_dead_letters(streams: Streams):
    spec = await streams.topic(partitions=2)
    first, second = make_event(spec, "a", 0), make_event(spec, "b", 0)
    poisoned = {first.id, second.id}
    handled: list[str] = []

    async def handler(d: Delivery) -> None:
        if d.event.id in poisoned:
            raise RuntimeError("not yet")
        handled.append(d.event.id)

    await streams.consume(spec, "replayer", handler, RetryPolicy(1, 0.01, 0.01))
    await streams.backend.publish(spec, [first, second])
    await wait_until(
        lambda: _dlq_size(streams, spec, 2), 10, "both events in the dead-letter queue"
    )
    letters = {d.event.id: d for d in await streams.backend.dead_letters(spec)}
    assert set(letters) == {first.id, second.id}
    assert all(d.attempts == 1 for d in letters.values())

    assert await streams.backend.drop_dead_letter(spec, letters[first.id].sequence) is True
    assert await streams.backend.drop_dead_letter(spec, letters[first.id].sequence) is False
    assert [d.event.id for d in await streams.backend.dead_letters(spec)] == [second.id]

    poisoned.clear()  # the bug is fixed: the replay now succeeds
    replayed = await streams.backend.replay_dead_letter(spec, letters[second.id].sequence)
    assert replayed.id == second.id
    await wait_until(lambda: second.id in handled, 10, "the replayed event")
    assert handled == [second.id]  # the dropped one is gone for good
    assert await streams.backend.dead_letters(spec) == []
    assert (await streams.backend.topic_status(spec)).messages == 3
    with pytest.raises(TopicError):
        await streams.backend.replay_dead_letter(spec, letters[second.id].sequence)


async def _dlq_size(streams: Streams, spec: TopicSpec, size: int) -> bool:
    return (await streams.backend.topic_status(spec)).dlq_size == size


# -- groups ------------------------------------------------------------------------------


async def test_every_group_gets_every_event(streams: Streams):
    spec = await streams.topic(partitions=4)
    got: dict[str, list[str]] = {"audit": [], "mailer": []}

    def recorder(group: str) -> Handler:
        async def handler(d: Delivery) -> None:
            got[group].append(d.event.id)

        return handler

    for group in got:
        await streams.consume(spec, group, recorder(group))
    events = [make_event(spec, f"k{i}", i) for i in range(40)]
    await streams.backend.publish(spec, events)
    ids = {e.id for e in events}
    await wait_until(lambda: all(len(v) >= 40 for v in got.values()), 15, "both groups")
    await asyncio.sleep(0.2)
    for group, seen in got.items():
        assert len(seen) == 40, group
        assert set(seen) == ids, group


async def test_lag_counts_what_a_stopped_group_has_not_handled(streams: Streams):
    spec = await streams.topic(partitions=2)
    seen: list[str] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.event.id)

    stop = await streams.consume(spec, "lagger", handler)
    first = [make_event(spec, f"k{i}", i) for i in range(6)]
    await streams.backend.publish(spec, first)
    await wait_until(lambda: len(seen) == 6, 10, "the first batch")
    await wait_until(lambda: _lag_is(streams, spec, "lagger", 0), 10, "lag 0")
    status = await streams.backend.group_status(spec, "lagger")
    assert (status.lag, status.in_flight) == (0, 0)

    await stop()
    second = [make_event(spec, f"k{i}", i) for i in range(5)]
    await streams.backend.publish(spec, second)
    await asyncio.sleep(0.2)
    assert (await streams.backend.group_status(spec, "lagger")).lag == 5
    assert len(seen) == 6

    # The group's position is durable: a restart handles only what it missed.
    await streams.consume(spec, "lagger", handler)
    await wait_until(lambda: len(seen) == 11, 10, "the missed events")
    await wait_until(lambda: _lag_is(streams, spec, "lagger", 0), 10, "lag 0 again")
    assert sorted(seen) == sorted(e.id for e in first + second)
    with pytest.raises(TopicError):
        await streams.backend.group_status(spec, "nobody")


async def test_reset_group_rehandles_from_a_sequence(streams: Streams):
    spec = await streams.topic(partitions=2)
    first_pass: dict[str, int] = {}
    again: list[tuple[str, int]] = []

    async def handler(d: Delivery) -> None:
        first_pass[d.event.id] = d.sequence

    stop = await streams.consume(spec, "projector", handler)
    events = [make_event(spec, f"k{i}", i) for i in range(10)]
    await streams.backend.publish(spec, events)
    await wait_until(lambda: len(first_pass) == 10, 10, "the first pass")
    await stop()
    assert sorted(first_pass.values()) == list(range(1, 11))

    k = 6
    await streams.backend.reset_group(spec, "projector", StartPosition.at_sequence(k))

    async def rehandler(d: Delivery) -> None:
        again.append((d.event.id, d.sequence))

    stop = await streams.consume(spec, "projector", rehandler)
    expected = {i for i, seq in first_pass.items() if seq >= k}
    await wait_until(lambda: len(again) >= len(expected), 10, "the replay")
    await asyncio.sleep(0.3)
    assert {i for i, _ in again} == expected
    assert len(again) == len(expected) == 10 - k + 1
    assert all(seq >= k for _, seq in again)
    await stop()

    again.clear()
    await streams.backend.reset_group(spec, "projector", StartPosition())
    await streams.consume(spec, "projector", rehandler)
    await wait_until(lambda: len(again) >= 10, 10, "a full replay")
    await asyncio.sleep(0.2)
    assert {i for i, _ in again} == set(first_pass)


async def test_a_new_only_group_starts_after_existing_events(streams: Streams):
    spec = await streams.topic(partitions=2)
    old = [make_event(spec, f"old{i}", i) for i in range(5)]
    await streams.backend.publish(spec, old)
    seen: list[str] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.event.id)

    await streams.consume(spec, "fresh", handler, start=StartPosition(everything=False))
    new = [make_event(spec, f"new{i}", i) for i in range(3)]
    await streams.backend.publish(spec, new)
    await wait_until(lambda: len(seen) >= 3, 10, "the new events")
    await asyncio.sleep(0.3)
    assert sorted(seen) == sorted(e.id for e in new)


async def test_a_group_can_start_at_a_time(streams: Streams):
    spec = await streams.topic(partitions=2)
    before = [make_event(spec, f"b{i}", i) for i in range(4)]
    await streams.backend.publish(spec, before)
    await asyncio.sleep(0.1)
    cut = time.time()
    await asyncio.sleep(0.1)
    after = [make_event(spec, f"a{i}", i) for i in range(3)]
    await streams.backend.publish(spec, after)
    seen: list[str] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.event.id)

    await streams.consume(spec, "since", handler, start=StartPosition.at_time(cut))
    await wait_until(lambda: len(seen) >= 3, 10, "the events after the cut")
    await asyncio.sleep(0.3)
    assert sorted(seen) == sorted(e.id for e in after)


# -- retention and topics ---------------------------------------------------------------


async def test_events_older_than_max_age_are_dropped(streams: Streams):
    spec = await streams.topic(partitions=2, max_age_s=1.0, duplicate_window_s=1.0)
    await streams.backend.publish(spec, [make_event(spec, f"k{i}", i) for i in range(5)])
    assert (await streams.backend.topic_status(spec)).messages == 5
    # No new publish: age alone must expire them.
    await wait_until(lambda: _messages_are(streams, spec, 0), 8, "the old events to expire")
    seen: list[str] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.event.id)

    await streams.consume(spec, "late", handler)
    fresh = [make_event(spec, f"f{i}", i) for i in range(2)]
    await streams.backend.publish(spec, fresh)
    await wait_until(lambda: len(seen) >= 2, 10, "the fresh events")
    await asyncio.sleep(0.2)
    assert sorted(seen) == sorted(e.id for e in fresh)


async def _messages_are(streams: Streams, spec: TopicSpec, n: int) -> bool:
    return (await streams.backend.topic_status(spec)).messages == n


async def test_a_max_age_shorter_than_the_default_dedup_window_is_accepted(streams: Streams):
    # duplicate_window_s defaults to 120 s; a 60 s retention must still make a topic.
    spec = await streams.topic(partitions=2, max_age_s=60.0)
    event = make_event(spec, "k", 0)
    await streams.backend.publish(spec, [event, event])
    assert (await streams.backend.topic_status(spec)).messages == 1


async def test_ensure_topic_is_idempotent_and_unknown_topics_are_errors(streams: Streams):
    spec = await streams.topic(partitions=3)
    await streams.backend.publish(spec, [make_event(spec, "k", 0)])
    await streams.backend.ensure_topic(spec)
    assert (await streams.backend.topic_status(spec)).messages == 1
    ghost = TopicSpec(f"t{uuid.uuid4().hex[:12]}.ghost")
    with pytest.raises(TopicError):
        await streams.backend.topic_status(ghost)
