"""Prometheus metrics of the realtime hub (in `tenfold.observe.metrics.REGISTRY`, on /metrics).

Gauges of the current state are read from the live hubs when scraped (nothing
on the hot path); counters on the fan-out path are plain integers bumped once
per frame per node (not once per subscriber); the latency histogram is observed
once per published frame per node.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tenfold.observe.metrics import REGISTRY, PlainCounter

__all__ = [
    "delivered",
    "dropped",
    "publish_to_send",
    "refusals",
    "slow_consumers",
    "track",
]


class _HubState(Collector):
    """`tenfold_realtime_connections` and `_subscriptions`, summed over this process's hubs."""

    def __init__(self) -> None:
        self.hubs: weakref.WeakSet[Any] = weakref.WeakSet()
        REGISTRY.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        hubs = list(self.hubs)
        conns = GaugeMetricFamily(
            "tenfold_realtime_connections", "Open, authenticated /ws connections."
        )
        conns.add_metric([], sum(len(h.connections) for h in hubs))
        subs = GaugeMetricFamily(
            "tenfold_realtime_subscriptions", "Channel subscriptions of open connections."
        )
        subs.add_metric([], sum(len(s) for h in hubs for s in list(h.channels.values())))
        yield conns
        yield subs


_state = _HubState()


def track(hub: Any) -> None:
    """Count `hub` in the connection and subscription gauges (while it lives)."""
    _state.hubs.add(hub)


delivered = PlainCounter(
    "tenfold_realtime_messages_delivered_total",
    "msg frames handed to subscribers (written, or queued behind a busy socket).",
    [],
    registry=REGISTRY,
).labels()
dropped = PlainCounter(
    "tenfold_realtime_frames_dropped_total",
    "Frames discarded from the send queues of slow consumers when they were disconnected.",
    [],
    registry=REGISTRY,
).labels()
slow_consumers = PlainCounter(
    "tenfold_realtime_slow_consumers_total",
    "Connections closed with 4009 because their bounded send queue overflowed.",
    [],
    registry=REGISTRY,
).labels()
refusals = Counter(
    "tenfold_realtime_refusals_total",
    "Requests refused by a limit, by kind (connections: per user, 4008; channels: "
    "per connection; publish_rate: per connection).",
    ["kind"],
    registry=REGISTRY,
)
publish_to_send = Histogram(
    "tenfold_realtime_publish_to_send_seconds",
    "From a publish (on any node) to its frame being handed to every subscriber on this "
    "node, per published frame and node (wall clocks: nodes' clocks must agree).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
