"""The event log's vocabulary and the stream backend interface.

Contract every `StreamBackend` keeps (the shared suite in
tests/integration/test_events_backends.py runs it against each):

- A topic has `partitions` partitions; an event goes to partition
  `slot % partitions`, so all events of one key stay in one partition, in the
  order they were published.
- `publish` is idempotent per `Event.msg_id` within the dedup window: a
  re-publish after a crash between publish and mark is dropped by the broker.
  It returns only when every event is stored (acknowledged), or raises
  `BrokerUnavailable` (nothing is known to be stored past the first failure).
- A group consumes every partition in parallel, each partition strictly in
  order with one event in flight, so a retried event holds its partition;
  an event is acknowledged only after its handler succeeded.
- A handler failure is retried with exponential backoff and jitter up to
  `RetryPolicy.max_attempts`; then the event, with the error and the attempt
  count, goes to the topic's dead-letter queue and the partition moves on.
- A backend that is not `durable` (its events die with the process) reports,
  through `on_settled`, each event every group has finished; the relay marks
  an outbox row published only then, so a crash loses nothing it had taken.
"""

from __future__ import annotations

import abc
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from tenfold import backends
from tenfold.errors import ConfigError, TopicError

__all__ = [
    "DeadLetter",
    "Delivery",
    "Event",
    "GroupStatus",
    "Handler",
    "RetryPolicy",
    "StartPosition",
    "StreamBackend",
    "TopicSpec",
    "TopicStatus",
    "backend_from_url",
    "check_topic_name",
]

_TOPIC = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_GROUP = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def check_topic_name(name: str) -> str:
    """`name` if it is a valid topic (dotted lowercase words), else `TopicError`."""
    if not isinstance(name, str) or not _TOPIC.match(name) or len(name) > 120:
        raise TopicError(
            f"topic name {name!r} is invalid: use lowercase words joined by dots, "
            "e.g. chat.messages"
        )
    return name


def check_group_name(name: str) -> str:
    if not isinstance(name, str) or not _GROUP.match(name):
        raise TopicError(
            f"consumer group {name!r} is invalid: lowercase letters, digits and _, "
            "starting with a letter"
        )
    return name


@dataclass(frozen=True, slots=True)
class Event:
    """One event as stored in the outbox and carried by the stream."""

    id: str
    topic: str
    key: str
    slot: int
    payload: bytes
    created_at: float
    headers: Mapping[str, str] = field(default_factory=dict)
    # The broker's de-duplication id: the event id, or a suffixed one for a DLQ replay.
    msg_id: str = ""

    def data(self) -> Any:
        """The payload, decoded from JSON."""
        return orjson.loads(self.payload)

    @property
    def dedup_id(self) -> str:
        return self.msg_id or self.id


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event handed to a consumer: which attempt this is, and where it sits."""

    event: Event
    attempt: int
    partition: int
    sequence: int


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic's partitioning and retention. Units are in the names."""

    name: str
    partitions: int = 16
    max_age_s: float = 7 * 24 * 3600.0
    max_bytes: int = -1
    max_event_bytes: int = 1024 * 1024 - 4096
    duplicate_window_s: float = 120.0

    def __post_init__(self) -> None:
        check_topic_name(self.name)
        if not 1 <= self.partitions <= 4096:
            raise ConfigError(
                f"topic {self.name}", f"partitions must be 1..4096, got {self.partitions}"
            )
        if self.max_age_s <= 0 or self.duplicate_window_s <= 0:
            raise ConfigError(f"topic {self.name}", "max_age_s and duplicate_window_s must be > 0")
        if self.max_event_bytes < 1024:
            raise ConfigError(f"topic {self.name}", "max_event_bytes must be >= 1024")

    def partition_of(self, slot: int) -> int:
        return slot % self.partitions


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter (AWS's "full jitter")."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("RetryPolicy.max_attempts", f"must be >= 1, got {self.max_attempts}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ConfigError(
                "RetryPolicy.initial_backoff_s",
                f"need 0 < initial_backoff_s ({self.initial_backoff_s}) <= max_backoff_s "
                f"({self.max_backoff_s})",
            )
        if not self.multiplier >= 1.0:
            raise ConfigError(
                "RetryPolicy.multiplier", f"must be >= 1 (backoff grows), got {self.multiplier}"
            )

    def backoff_s(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Delay before attempt `attempt + 1`, uniformly in [0, capped exponential]."""
        try:
            grown = self.initial_backoff_s * self.multiplier ** (attempt - 1)
        except OverflowError:  # a huge attempt count (many redeliveries): the cap applies
            grown = self.max_backoff_s
        ceiling = min(self.max_backoff_s, grown)
        return ceiling * rand()

    def gives_up(self, attempt: int) -> bool:
        """True when attempt number `attempt` (1-based) was the last one allowed."""
        return attempt >= self.max_attempts


@dataclass(frozen=True, slots=True)
class StartPosition:
    """Where a (re)started group begins: new events only, everything, a sequence or a time."""

    sequence: int | None = None
    time_s: float | None = None
    everything: bool = True

    @classmethod
    def at_sequence(cls, sequence: int) -> StartPosition:
        return cls(sequence=sequence, everything=False)

    @classmethod
    def at_time(cls, time_s: float) -> StartPosition:
        return cls(time_s=time_s, everything=False)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event that exhausted its attempts, with why."""

    sequence: int
    event: Event
    group: str
    error: str
    attempts: int
    failed_at: float


@dataclass(frozen=True, slots=True)
class TopicStatus:
    topic: str
    messages: int
    bytes: int
    last_sequence: int
    dlq_size: int


@dataclass(frozen=True, slots=True)
class GroupStatus:
    topic: str
    group: str
    lag: int
    in_flight: int


class StreamBackend(abc.ABC):
    """Topics, partitions, durable groups and dead letters on one broker."""

    # False for a stream that lives in process memory. Its events die with the
    # process, so the relay marks an outbox row published only once the stream
    # reports the event settled (`on_settled`): the outbox is then the durable log.
    durable: bool = True

    def on_settled(self, listener: Callable[[list[Event]], None]) -> None:
        """Call `listener` with events every consumer group has finished (non-durable only).

        "Finished" is acknowledged or dead-lettered by every group with a
        position on the topic (at publish when there is none), or dropped by
        retention. Each event is reported once. Durable backends never call it.
        """
        if not self.durable:
            raise NotImplementedError(f"{type(self).__name__} is not durable: implement on_settled")

    def off_settled(self, listener: Callable[[list[Event]], None]) -> None:
        """Stop calling `listener` (see `on_settled`)."""
        return None

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; raise `BrokerUnavailable` if the broker cannot be reached in time."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise `BrokerUnavailable` unless the broker answers now (readiness probes).

        In-process backends are always reachable, hence this default.
        """
        return None

    @abc.abstractmethod
    async def ensure_topic(self, spec: TopicSpec) -> None:
        """Create or update the topic's stream (retention, limits) and its DLQ."""

    @abc.abstractmethod
    async def publish(self, spec: TopicSpec, events: list[Event]) -> None:
        """Store `events` in order, de-duplicated by `dedup_id`; return once all are acked."""

    @abc.abstractmethod
    async def consume(
        self,
        spec: TopicSpec,
        group: str,
        handler: Handler,
        policy: RetryPolicy,
        start: StartPosition,
    ) -> Callable[[], Awaitable[None]]:
        """Start consuming every partition for `group`; return an async stop function."""

    @abc.abstractmethod
    async def reset_group(self, spec: TopicSpec, group: str, start: StartPosition) -> None:
        """Rewind (or fast-forward) `group` to `start`; for replays and rebuilt projections."""

    @abc.abstractmethod
    async def topic_status(self, spec: TopicSpec) -> TopicStatus: ...

    @abc.abstractmethod
    async def group_status(self, spec: TopicSpec, group: str) -> GroupStatus: ...

    @abc.abstractmethod
    async def topics(self) -> list[TopicSpec]:
        """Every tenfold topic the broker holds (for tools that did not declare them)."""

    @abc.abstractmethod
    async def groups(self, spec: TopicSpec) -> list[str]:
        """The consumer groups that have a position on `spec`."""

    @abc.abstractmethod
    async def dead_letters(self, spec: TopicSpec, limit: int = 100) -> list[DeadLetter]: ...

    @abc.abstractmethod
    async def drop_dead_letter(self, spec: TopicSpec, sequence: int) -> bool: ...

    async def replay_dead_letter(self, spec: TopicSpec, sequence: int) -> Event:
        """Publish a dead letter to its topic again (a fresh dedup id) and drop it from the DLQ."""
        letters = {d.sequence: d for d in await self.dead_letters(spec, limit=100_000)}
        if sequence not in letters:
            raise TopicError(f"no dead letter {sequence} in the DLQ of {spec.name}")
        event = letters[sequence].event
        again = Event(
            event.id,
            event.topic,
            event.key,
            event.slot,
            event.payload,
            event.created_at,
            dict(event.headers),
            msg_id=f"{event.id}.replay.{sequence}",
        )
        await self.publish(spec, [again])
        await self.drop_dead_letter(spec, sequence)
        return again


def backend_from_url(url: str, **options: Any) -> StreamBackend:
    """The stream backend for `memory://`, `nats://host:port` or a registered scheme.

    Raises:
        ConfigError: for a scheme `tenfold.backends` does not know (it lists those it does).
    """
    backend: StreamBackend = backends.backend_class("events", url)(url, **options)
    return backend
