"""In-process stream backend: the embedded mode's event log and the fast test double.

Same semantics as JetStream for everything in `StreamBackend`'s contract:
partitions by slot, de-duplication by id within a window, durable group
positions (for the life of the process), one event in flight per partition,
retries with backoff, a DLQ per topic, retention by age and bytes.

Crash safety comes from the outbox, not from this module: the stream is not
durable, so it reports each event once every consumer group has finished it
(`on_settled`), and only then does the relay mark its outbox row published.
A process killed at any instant leaves its unfinished events unpublished in
the outbox, and the next relay to hold the shard's lease publishes them again.

    outbox row ─relay─▶ publish here ─▶ every group acks or dead-letters it
               ◀── mark published ◀── settled(events) ◀┘

Invariants:
- Sequences per topic start at 1 and only grow; a partition's entries are in
  sequence order.
- A (group, partition) position advances only after the handler succeeded or
  the event was dead-lettered; one task at a time works a (group, partition).
- Every queue is bounded by the topic's retention (`max_age_s`, `max_bytes`),
  and its delivered part by `keep_delivered` (see `MemoryStreams`).
- An event is reported settled exactly once, and only when every group's
  position on its partition is past it (or retention dropped it); with no
  group on the topic, at publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenfold.errors import TopicError
from tenfold.events.base import (
    DeadLetter,
    Delivery,
    Event,
    GroupStatus,
    Handler,
    RetryPolicy,
    StartPosition,
    StreamBackend,
    TopicSpec,
    TopicStatus,
)
from tenfold.events.dispatch import deliver

__all__ = ["MemoryStreams"]

log = logging.getLogger("tenfold.events.memory")


@dataclass
class _Entry:
    seq: int
    stored_at: float
    event: Event


@dataclass
class _Partition:
    entries: list[_Entry] = field(default_factory=list)
    first: int = 0  # absolute index of entries[0] (older ones were trimmed)
    settled: int = 0  # absolute index: every group has finished the entries before it
    # Set (and replaced) when the partition gets entries: only its own workers
    # wake, not every partition's (a topic-wide condition woke 16 tasks per publish).
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        event, self.wake = self.wake, asyncio.Event()
        event.set()

    @property
    def end(self) -> int:
        return self.first + len(self.entries)

    def get(self, index: int) -> _Entry:
        return self.entries[index - self.first]


@dataclass
class _Topic:
    spec: TopicSpec
    partitions: list[_Partition]
    seq: int = 0
    bytes: int = 0
    # An OrderedDict: its front is O(1) to read after deletions, where a dict's
    # skips every deleted slot (~1 ms per publish batch at 3,000 events/s, and
    # arena's p99 at 80-108 ms once the 120 s window began to expire).
    seen: OrderedDict[str, float] = field(default_factory=OrderedDict)
    groups: dict[str, list[int]] = field(default_factory=dict)
    locks: dict[tuple[str, int], asyncio.Lock] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    dlq: dict[int, DeadLetter] = field(default_factory=dict)
    # Settle mode: dedup ids stored and not yet settled, and duplicates published
    # meanwhile (an outbox row carried to a new shard by a reshard), settled with them.
    unsettled: set[str] = field(default_factory=set)
    dups: dict[str, list[Event]] = field(default_factory=dict)
    dlq_seq: int = 0


class MemoryStreams(StreamBackend):
    """Topics in this process's memory. `url` is `memory://` (the rest is ignored).

    Besides the topic's own retention (age, bytes), a partition keeps only the
    newest `keep_delivered` events that every consumer group has passed (all of
    them count as passed while the topic has no group); events some group has
    yet to handle are always kept. Without that bound a busy process held every
    event for `max_age_s` (7 days by default) in its heap: memory grew without
    end, and so did the work of each full garbage collection. A group started
    later from `everything` sees what is kept.
    """

    def __init__(
        self,
        url: str = "memory://",
        *,
        handler_timeout_s: float = 30.0,
        keep_delivered: int = 1024,
        clock: Callable[[], float] = time.time,
        **_: object,
    ) -> None:
        if keep_delivered < 0:
            raise ValueError(f"keep_delivered must be >= 0, got {keep_delivered}")
        self.url = url
        self.handler_timeout_s = handler_timeout_s
        self.keep_delivered = keep_delivered
        self._clock = clock
        self._topics: dict[str, _Topic] = {}
        self._listeners: list[Callable[[list[Event]], None]] = []

    durable = False

    def on_settled(self, listener: Callable[[list[Event]], None]) -> None:
        self._listeners.append(listener)

    def off_settled(self, listener: Callable[[list[Event]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _duplicate(self, topic: _Topic, event: Event) -> None:
        """A publish the dedup window dropped: settled when the stored one is (now, if
        it already was), so its outbox row is marked and does not wait forever."""
        if event.dedup_id in topic.unsettled:
            topic.dups.setdefault(event.dedup_id, []).append(event)
        else:
            self._report([event], topic)

    def _report(self, events: list[Event], topic: _Topic | None = None) -> None:
        if topic is not None and (topic.unsettled or topic.dups):
            extra: list[Event] = []
            for e in events:
                topic.unsettled.discard(e.dedup_id)
                extra += topic.dups.pop(e.dedup_id, ())
            events = events + extra
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:  # a listener's bug must not stop a partition's worker
                log.exception("settled-events listener %r failed", listener)

    def _settle(self, topic: _Topic, p: int) -> None:
        """Report the entries of partition `p` that every group has now passed."""
        part = topic.partitions[p]
        upto = min(min((c[p] for c in topic.groups.values()), default=part.end), part.end)
        if upto <= part.settled:
            return
        start = max(part.settled, part.first)
        part.settled = upto
        if self._listeners and start < upto:
            self._report([part.get(i).event for i in range(start, upto)], topic)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _topic(self, spec: TopicSpec) -> _Topic:
        topic = self._topics.get(spec.name)
        if topic is None:
            raise TopicError(f"topic {spec.name} does not exist yet: ensure_topic() it first")
        self._trim(topic, self._clock())  # age retention applies without new publishes too
        return topic

    async def ensure_topic(self, spec: TopicSpec) -> None:
        topic = self._topics.get(spec.name)
        if topic is None:
            self._topics[spec.name] = _Topic(spec, [_Partition() for _ in range(spec.partitions)])
        elif topic.spec.partitions != spec.partitions:
            raise TopicError(
                f"topic {spec.name} has {topic.spec.partitions} partitions, asked for "
                f"{spec.partitions}: changing the count would reorder keys; create a new topic"
            )
        else:
            topic.spec = spec

    async def publish(self, spec: TopicSpec, events: list[Event]) -> None:
        topic = self._topic(spec)
        now = self._clock()
        window = topic.spec.duplicate_window_s
        touched: set[int] = set()
        for event in events:
            if topic.seen.get(event.dedup_id, 0.0) > now:
                if self._listeners:
                    self._duplicate(topic, event)
                continue
            topic.seen[event.dedup_id] = now + window
            if self._listeners:
                topic.unsettled.add(event.dedup_id)
            topic.seq += 1
            index = topic.spec.partition_of(event.slot)
            topic.partitions[index].entries.append(_Entry(topic.seq, now, event))
            topic.bytes += len(event.payload)
            touched.add(index)
        if not topic.groups:  # nobody will consume them: settled as they are stored
            for index in touched:
                self._settle(topic, index)
        self._trim(topic, now)
        for index in touched:
            topic.partitions[index].notify()

    def _trim(self, topic: _Topic, now: float) -> None:
        spec = topic.spec
        oldest = now - spec.max_age_s
        for part in topic.partitions:
            while part.entries and part.entries[0].stored_at < oldest:
                self._drop_oldest(topic, part)
        keep = self.keep_delivered
        for p, part in enumerate(topic.partitions):
            passed = min((cursor[p] for cursor in topic.groups.values()), default=part.end)
            # Never past `settled`: an entry is reported settled before it is trimmed.
            drop = min(passed, part.end, part.settled) - keep - part.first
            if drop > max(32, keep // 8):  # in chunks: a list's front is costly to cut
                topic.bytes -= sum(len(e.event.payload) for e in part.entries[:drop])
                del part.entries[:drop]
                part.first += drop
        while spec.max_bytes >= 0 and topic.bytes > spec.max_bytes:
            # Drop the globally oldest entry, as a limits-based stream does.
            part = min((p for p in topic.partitions if p.entries), key=lambda p: p.entries[0].seq)
            self._drop_oldest(topic, part)
        # Expiries are insertion-ordered (one window per topic): drop from the front.
        seen = topic.seen
        while seen:
            first = next(iter(seen))
            if seen[first] > now:
                break
            seen.popitem(last=False)

    def _drop_oldest(self, topic: _Topic, part: _Partition) -> None:
        entry = part.entries.pop(0)
        topic.bytes -= len(entry.event.payload)
        part.first += 1
        if part.settled < part.first:  # retention took an unfinished event: as JetStream's does
            part.settled = part.first
            self._report([entry.event], topic)

    def _start_index(self, part: _Partition, start: StartPosition) -> int:
        if start.sequence is not None:
            return next(
                (part.first + i for i, e in enumerate(part.entries) if e.seq >= start.sequence),
                part.end,
            )
        if start.time_s is not None:
            return next(
                (part.first + i for i, e in enumerate(part.entries) if e.stored_at >= start.time_s),
                part.end,
            )
        return part.first if start.everything else part.end

    async def consume(
        self,
        spec: TopicSpec,
        group: str,
        handler: Handler,
        policy: RetryPolicy,
        start: StartPosition,
    ) -> Callable[[], Awaitable[None]]:
        topic = self._topic(spec)
        if group not in topic.groups:
            topic.groups[group] = [self._start_index(p, start) for p in topic.partitions]
        stopping = asyncio.Event()
        tasks = [
            asyncio.create_task(self._work(topic, group, p, handler, policy, stopping))
            for p in range(spec.partitions)
        ]

        async def stop() -> None:
            stopping.set()
            _wake_all(topic)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        return stop

    async def _work(
        self,
        topic: _Topic,
        group: str,
        p: int,
        handler: Handler,
        policy: RetryPolicy,
        stopping: asyncio.Event,
    ) -> None:
        part = topic.partitions[p]
        lock = topic.locks.setdefault((group, p), asyncio.Lock())
        while not stopping.is_set():
            async with lock:
                cursor = topic.groups[group]
                index = max(cursor[p], part.first)
                if index < part.end:
                    entry = part.get(index)
                    done = await self._handle(topic, group, p, entry, handler, policy, stopping)
                    # A reset_group meanwhile replaced the list: the reset wins.
                    if done and cursor is topic.groups[group]:
                        cursor[p] = index + 1
                        self._settle(topic, p)
                    continue
            wake = part.wake
            if stopping.is_set() or max(topic.groups[group][p], part.first) < part.end:
                continue
            await wake.wait()

    async def _handle(
        self,
        topic: _Topic,
        group: str,
        p: int,
        entry: _Entry,
        handler: Handler,
        policy: RetryPolicy,
        stopping: asyncio.Event,
    ) -> bool:
        """Deliver until acked or dead-lettered (True), or until stopped (False)."""
        attempt = 1
        topic.in_flight[group] = topic.in_flight.get(group, 0) + 1
        try:
            while not stopping.is_set():
                outcome = await deliver(
                    handler,
                    Delivery(entry.event, attempt, p, entry.seq),
                    policy,
                    group,
                    self.handler_timeout_s,
                )
                if outcome.action == "retry":
                    attempt += 1
                    try:
                        async with asyncio.timeout(outcome.delay_s):
                            await stopping.wait()
                    except TimeoutError:
                        pass
                    continue
                if outcome.action == "dead":
                    topic.dlq_seq += 1
                    topic.dlq[topic.dlq_seq] = DeadLetter(
                        topic.dlq_seq, entry.event, group, outcome.error, attempt, self._clock()
                    )
                return True
            return False
        finally:
            topic.in_flight[group] -= 1

    async def reset_group(self, spec: TopicSpec, group: str, start: StartPosition) -> None:
        topic = self._topic(spec)
        topic.groups[group] = [self._start_index(p, start) for p in topic.partitions]
        _wake_all(topic)

    async def topic_status(self, spec: TopicSpec) -> TopicStatus:
        topic = self._topic(spec)
        messages = sum(len(p.entries) for p in topic.partitions)
        return TopicStatus(spec.name, messages, topic.bytes, topic.seq, len(topic.dlq))

    async def group_status(self, spec: TopicSpec, group: str) -> GroupStatus:
        topic = self._topic(spec)
        cursor = topic.groups.get(group)
        if cursor is None:
            raise TopicError(f"no consumer group {group!r} on topic {spec.name}")
        lag = sum(p.end - max(c, p.first) for p, c in zip(topic.partitions, cursor, strict=True))
        return GroupStatus(spec.name, group, lag, topic.in_flight.get(group, 0))

    async def topics(self) -> list[TopicSpec]:
        return [t.spec for _, t in sorted(self._topics.items())]

    async def groups(self, spec: TopicSpec) -> list[str]:
        return sorted(self._topic(spec).groups)

    async def dead_letters(self, spec: TopicSpec, limit: int = 100) -> list[DeadLetter]:
        return [self._topic(spec).dlq[s] for s in sorted(self._topic(spec).dlq)[:limit]]

    async def drop_dead_letter(self, spec: TopicSpec, sequence: int) -> bool:
        return self._topic(spec).dlq.pop(sequence, None) is not None


def _wake_all(topic: _Topic) -> None:
    for part in topic.partitions:
        part.notify()
