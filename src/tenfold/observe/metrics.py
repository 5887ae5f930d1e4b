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
breaker_state = Gauge(
    "tenfold_breaker_state",
    "Circuit breaker state per dependency (0 closed, 1 half-open, 2 open).",
    ["name"],
    registry=REGISTRY,
)
breaker_transitions = Counter(
    "tenfold_breaker_transitions_total",
    "Circuit breaker state changes per dependency, by the state entered.",
    ["name", "state"],
    registry=REGISTRY,
)
bulkhead_in_use = Gauge(
    "tenfold_bulkhead_in_use", "Calls in flight inside a bulkhead.", ["name"], registry=REGISTRY
)
bulkhead_rejections = Counter(
    "tenfold_bulkhead_rejections_total",
    "Calls refused by a full bulkhead.",
    ["name"],
    registry=REGISTRY,
)
retries = Counter(
    "tenfold_retries_total",
    "Retries of idempotent calls (attempts after the first), per named operation.",
    ["what"],
    registry=REGISTRY,
)
cache_hits = Counter(
    "tenfold_cache_hits_total",
    "Cache reads answered without the loader, by tier (l1, l2, stale, fail_safe).",
    ["tier"],
    registry=REGISTRY,
)
cache_misses = Counter(
    "tenfold_cache_misses_total",
    "Cache reads that missed a tier (l1, l2).",
    ["tier"],
    registry=REGISTRY,
)
cache_loader_seconds = Histogram(
    "tenfold_cache_loader_seconds", "Time in cache loaders.", registry=REGISTRY
)
cache_invalidations = Counter(
    "tenfold_cache_invalidations_total",
    "Cache invalidations by kind (key, tag, received, resync).",
    ["kind"],
    registry=REGISTRY,
)
admission_limit = Gauge(
    "tenfold_admission_limit",
    "Current adaptive concurrency limit of admission control.",
    registry=REGISTRY,
)
admission_in_flight = Gauge(
    "tenfold_admission_in_flight", "Requests admitted and not yet finished.", registry=REGISTRY
)
admission_shed = Counter(
    "tenfold_admission_shed_total",
    "Requests shed by admission control (503 + Retry-After), by priority class.",
    ["priority"],
    registry=REGISTRY,
)
