"""The event log: transactional outbox, relay, streams, consumers, DLQ, replay."""

from tenfold.events.base import (
    DeadLetter,
    Delivery,
    Event,
    GroupStatus,
    RetryPolicy,
    StartPosition,
    StreamBackend,
    TopicSpec,
    TopicStatus,
    backend_from_url,
)
from tenfold.events.bus import EventBus
from tenfold.events.relay import OutboxRelay

__all__ = [
    "DeadLetter",
    "Delivery",
    "Event",
    "EventBus",
    "GroupStatus",
    "OutboxRelay",
    "RetryPolicy",
    "StartPosition",
    "StreamBackend",
    "TopicSpec",
    "TopicStatus",
    "backend_from_url",
]
