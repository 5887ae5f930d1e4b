"""Prometheus metrics of every capability, in one registry.

Names follow Prometheus conventions (`_total` counters, base units). Label
values are bounded sets (shards, topics, groups, outcomes), never keys or ids.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate, pairwise
from math import inf
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["REGISTRY", "PlainCounter", "PlainHistogram", "child"]

REGISTRY = CollectorRegistry(auto_describe=True)
_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, remembered: on a per-event path `labels()` (a lock,
    a tuple and a dict lookup) costs more than the increment itself. Label values
    are bounded sets by this module's rule, so the memo stays small."""
    key = (id(metric), values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


class PlainCount:
    """One child of a `PlainCounter`: an integer, incremented without a lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class PlainCounter(Collector):
    """A labelled counter whose children are plain integers, read when scraped.

    For hot paths owned by one event loop (a cache hit): `inc()` is one integer
    add, without prometheus_client's per-call lock and checks. Increments from
    several threads at once may be lost (never corrupted); use `Counter` there.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._children: dict[tuple[str, ...], PlainCount] = {}
        registry.register(self)

    def labels(self, *values: str) -> PlainCount:
        """The child for these label values (bind it once; do not call per event)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
        return self._children.setdefault(tuple(values), PlainCount())

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class PlainBuckets:
    """One child of a `PlainHistogram`: per-bucket integers and a sum, without a lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative: one add per observe
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound lands in that bucket (Prometheus `le`).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far (derived, so it always equals the +Inf bucket)."""
        return sum(self.counts)


class PlainHistogram(Collector):
    """A labelled histogram whose children are plain integers and a float, read when scraped.

    For hot paths owned by one event loop (a request's duration): `observe()` is
    a bisect and two adds, without prometheus_client's per-call lock and checks.
    Observations from several threads at once may be lost (never corrupted); use
    `Histogram` there. Scraped as `_bucket` (cumulative), `_sum` and `_count`,
    without `_created`. A NaN observation lands in the first bucket.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] != inf:
            bounds.append(inf)
        if not bounds or not all(lo < hi for lo, hi in pairwise(bounds)):
            raise ValueError(f"{name}: buckets must be non-empty and increasing, got {buckets!r}")
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = tuple(bounds)
        # prometheus_client's own formatting, so `le` reads as a `Histogram`'s ("1.0", "+Inf")
        self._les = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], PlainBuckets] = {}
        registry.register(self)

    def labels(self, *values: str) -> PlainBuckets:
        """The child for these label values (bind it once; do not call per event)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
        found = self._children.get(values)
        if found is None:
            found = self._children[values] = PlainBuckets(self.bounds)
        return found

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative = list(zip(self._les, accumulate(child.counts), strict=True))
            family.add_metric(list(values), cumulative, child.sum)
        yield family


# Written per event on the event loop: plain here and in events_handled and handler_seconds.
events_emitted = PlainCounter(
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
events_handled = PlainCounter(
    "tenfold_events_handled_total",
    "Deliveries to consumers by outcome (ok, retry, dead_letter, duplicate).",
    ["topic", "group", "outcome"],
    registry=REGISTRY,
)
handler_seconds = PlainHistogram(
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
shard_up = Gauge(
    "tenfold_shard_up",
    "1 if the shard primary answered the last health check (/readyz, `tenfold status`), "
    'else 0; its breaker is tenfold_breaker_state{name="shard:<shard>"}.',
    ["shard"],
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


# Cache: `cache` is the TieredCache prefix (one per cache, a bounded set), so the
# hit ratio is per cache. TieredCache binds its children once per instance.
cache_hits = PlainCounter(
    "tenfold_cache_hits_total",
    "Cache reads answered without waiting for the loader, by tier (l1, l2, stale, fail_safe).",
    ["cache", "tier"],
    registry=REGISTRY,
)
cache_misses = PlainCounter(
    "tenfold_cache_misses_total",
    "Cache reads that missed a tier (l1, l2).",
    ["cache", "tier"],
    registry=REGISTRY,
)
cache_refreshes = Counter(
    "tenfold_cache_refreshes_total",
    "Background refreshes started, by kind (early: probabilistic, stale: stale-while-revalidate).",
    ["cache", "kind"],
    registry=REGISTRY,
)
cache_lock = Counter(
    "tenfold_cache_lock_total",
    "Cluster single-flight lock outcomes (won, lost, unknown, peer_value, took_over, expired).",
    ["cache", "outcome"],
    registry=REGISTRY,
)
cache_loader_seconds = Histogram(
    "tenfold_cache_loader_seconds", "Time in cache loaders.", ["cache"], registry=REGISTRY
)
cache_l2_seconds = Histogram(
    "tenfold_cache_l2_seconds",
    "Time in L2 calls by operation (get, set, delete, lock, ...), timeouts included.",
    ["cache", "op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
cache_invalidations = Counter(
    "tenfold_cache_invalidations_total",
    "Cache invalidations by kind (key, tag, received, resync).",
    ["cache", "kind"],
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
