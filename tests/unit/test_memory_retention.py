"""MemoryStreams keeps a bounded tail of delivered events, and every undelivered one."""

from __future__ import annotations

import asyncio

from tenfold.events.base import Delivery, Event, RetryPolicy, StartPosition, TopicSpec
from tenfold.events.memory import MemoryStreams

SPEC = TopicSpec("shop.orders", partitions=1)


def _events(first: int, n: int) -> list[Event]:
    return [
        Event(f"e{i}", SPEC.name, "k", 0, b'{"n": %d}' % i, 0.0) for i in range(first, first + n)
    ]


def _kept(streams: MemoryStreams) -> list[str]:
    part = streams._topics[SPEC.name].partitions[0]
    return [e.event.id for e in part.entries]


def _bytes_match(streams: MemoryStreams) -> bool:
    topic = streams._topics[SPEC.name]
    return topic.bytes == sum(len(e.event.payload) for p in topic.partitions for e in p.entries)


async def _until(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


async def test_delivered_events_are_trimmed_to_the_newest_few() -> None:
    streams = MemoryStreams(keep_delivered=10)
    await streams.ensure_topic(SPEC)
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.event.id)

    stop = await streams.consume(SPEC, "g", handler, RetryPolicy(), StartPosition())
    for batch in range(10):
        await streams.publish(SPEC, _events(batch * 50, 50))
        await _until(lambda b=batch: len(seen) == (b + 1) * 50)
    await streams.publish(SPEC, _events(500, 1))  # trims what the group has passed
    await _until(lambda: len(seen) == 501)
    await stop()
    assert seen == [f"e{i}" for i in range(501)]  # every event delivered, in order
    kept = _kept(streams)
    assert 11 <= len(kept) <= 10 + 33 + 1 and kept[-1] == "e500"  # not all 501
    assert _bytes_match(streams)
    assert (await streams.topic_status(SPEC)).messages == len(kept)


async def test_events_a_group_has_not_handled_are_never_trimmed() -> None:
    streams = MemoryStreams(keep_delivered=0)
    await streams.ensure_topic(SPEC)
    fast: list[str] = []
    gate = asyncio.Event()

    async def quick(delivery: Delivery) -> None:
        fast.append(delivery.event.id)

    async def stuck(delivery: Delivery) -> None:
        await gate.wait()

    stops = [
        await streams.consume(SPEC, "fast", quick, RetryPolicy(), StartPosition()),
        await streams.consume(SPEC, "slow", stuck, RetryPolicy(), StartPosition()),
    ]
    for batch in range(4):
        await streams.publish(SPEC, _events(batch * 50, 50))
    await _until(lambda: len(fast) == 200)
    await streams.publish(SPEC, _events(500, 1))  # a trim, after "fast" passed them all
    await _until(lambda: len(fast) == 201)
    assert _kept(streams)[0] == "e0" and len(_kept(streams)) == 201  # "slow" is on e0
    gate.set()
    await _until(lambda: _lag(streams) == 0)
    await streams.publish(SPEC, _events(200, 1))
    await _until(lambda: len(fast) == 202 and _lag(streams) == 0)
    await streams.publish(SPEC, _events(201, 1))  # a publish trims what both passed
    assert len(_kept(streams)) <= 33
    assert _bytes_match(streams)
    for stop in stops:
        await stop()


def _lag(streams: MemoryStreams) -> int:
    topic = streams._topics[SPEC.name]
    part = topic.partitions[0]
    return part.end - min(topic.groups["slow"][0], topic.groups["fast"][0])


async def test_a_topic_without_groups_keeps_only_the_tail() -> None:
    streams = MemoryStreams(keep_delivered=5)
    await streams.ensure_topic(SPEC)
    for batch in range(5):
        await streams.publish(SPEC, _events(batch * 40, 40))
    kept = _kept(streams)
    assert len(kept) <= 5 + 33 and kept[-1] == "e199"
    assert _bytes_match(streams)
