"""HTTP RED metrics (rate, errors, duration per route) and limiter decisions.

Routes are labelled by their template (`/rooms/{room_id}/messages`), never by
the raw path, so the label set stays bounded; unmatched paths share "unmatched".
"""

from __future__ import annotations

from prometheus_client import Gauge

from tenfold.observe.metrics import REGISTRY, PlainCounter, PlainHistogram

__all__ = [
    "http_in_flight",
    "http_requests",
    "http_seconds",
    "pool_in_use",
    "pool_size",
    "rate_limit_decisions",
]

# Written per request on the event loop: plain, without prometheus_client's lock.
http_requests = PlainCounter(
    "tenfold_http_requests_total",
    "HTTP requests by route template, method and status code.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
http_seconds = PlainHistogram(
    "tenfold_http_request_seconds",
    "HTTP request duration by route template and method.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
http_in_flight = Gauge("tenfold_http_in_flight", "HTTP requests being handled.", registry=REGISTRY)
rate_limit_decisions = PlainCounter(
    "tenfold_rate_limit_decisions_total",
    "Rate-limit decisions by rule and outcome (allowed, denied).",
    ["rule", "outcome"],
    registry=REGISTRY,
)
pool_in_use = Gauge(
    "tenfold_pool_in_use",
    "Connections checked out of each shard's primary pool (and the catalog's).",
    ["shard"],
    registry=REGISTRY,
)
pool_size = Gauge(
    "tenfold_pool_size",
    "Upper bound of each pool (max_size): saturation is in_use / size.",
    ["shard"],
    registry=REGISTRY,
)
