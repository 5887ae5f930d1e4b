"""The in-process stream wakes only the workers of partitions that got events."""

from __future__ import annotations

import asyncio

from tenfold.events.base import Event, RetryPolicy, StartPosition, TopicSpec
from tenfold.events.memory import MemoryStreams


def _event(n: int, slot: int) -> Event:
    return Event(f"e{n}", "t", f"k{n}", slot, b"{}", 0.0)


async def test_a_publish_wakes_only_its_partition_and_everything_arrives() -> None:
    streams = MemoryStreams()
    spec = TopicSpec("t", partitions=16)
    await streams.ensure_topic(spec)
    seen: list[str] = []

    async def handler(delivery: object) -> None:
        seen.append(delivery.event.id)  # type: ignore[attr-defined]

    stop = await streams.consume(spec, "g", handler, RetryPolicy(), StartPosition())
    await asyncio.sleep(0.01)  # every worker is now waiting
    topic = streams._topics["t"]
    before = [part.wake for part in topic.partitions]
    target = spec.partition_of(7)
    await streams.publish(spec, [_event(1, 7)])
    after = [part.wake for part in topic.partitions]
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a is not b]
    assert changed == [target]
    await streams.publish(spec, [_event(n, n * 300 % 4096) for n in range(2, 40)])
    async with asyncio.timeout(5):
        while len(seen) < 39:
            await asyncio.sleep(0.005)
    assert sorted(seen) == sorted(f"e{n}" for n in range(1, 40))
    await stop()
