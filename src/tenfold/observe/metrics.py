"""Prometheus metrics of every capability, in one registry.

Names follow Prometheus conventions (`_total` counters, base units). Label
values are bounded sets (shards, topics, groups, outcomes), never keys or ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REGISTRY"]

REGISTRY = CollectorRegistry(auto_describe=True)

events_emitted = Counter(
    "tenfold_events_emitted_total", "Events written to an outbox.", ["topic"], registry=REGISTRY
)
outbox_published = Counter(
    "tenfold_outbox_published_total",
    "Outbox rows published by the relay.",
    ["shard"],
    registry=REGISTRY,
)
relay_failures = Counter(
    "tenfold_relay_failures_total",
    "Relay passes that failed (broker or shard).",
    ["shard"],
    registry=REGISTRY,
)
outbox_pending = Gauge(
    "tenfold_outbox_pending", "Unpublished outbox rows per shard.", ["shard"], registry=REGISTRY
)
events_handled = Counter(
    "tenfold_events_handled_total",
    "Deliveries to consumers by outcome (ok, retry, dead_letter, duplicate).",
    ["topic", "group", "outcome"],
    registry=REGISTRY,
)
handler_seconds = Histogram(
    "tenfold_event_handler_seconds",
    "Time in event handlers.",
    ["topic", "group"],
    registry=REGISTRY,
)
consumer_lag = Gauge(
    "tenfold_consumer_lag",
    "Events not yet handled by a group.",
    ["topic", "group"],
    registry=REGISTRY,
)
dlq_size = Gauge(
    "tenfold_dlq_size", "Events in a topic's dead-letter queue.", ["topic"], registry=REGISTRY
)
