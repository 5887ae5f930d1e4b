"""`PlainHistogram` (and `PlainCounter`) scrape like prometheus_client's own metrics."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tenfold.observe.metrics import PlainCounter, PlainHistogram

BUCKETS = (0.1, 0.5, 1.0)
# Below, at and above every bound, zero, negative and huge: every edge of bisect_left.
OBSERVED = (-1.0, 0.0, 0.05, 0.1, 0.1000001, 0.3, 0.5, 0.5, 0.75, 1.0, 1.5, 1e9)


def _histogram(registry: CollectorRegistry, buckets: tuple[float, ...] = BUCKETS) -> PlainHistogram:
    return PlainHistogram("t_seconds", "Test time.", ["op"], registry=registry, buckets=buckets)


def _bucket(registry: CollectorRegistry, le: str, op: str = "get") -> float | None:
    return registry.get_sample_value("t_seconds_bucket", {"op": op, "le": le})


def test_value_equal_to_a_bound_lands_in_that_bucket() -> None:
    registry = CollectorRegistry()
    child = _histogram(registry).labels("get")
    child.observe(0.5)
    assert _bucket(registry, "0.1") == 0
    assert _bucket(registry, "0.5") == 1  # le: less or equal
    assert _bucket(registry, "1.0") == 1


def test_values_below_between_and_above_bounds_count_cumulatively() -> None:
    registry = CollectorRegistry()
    child = _histogram(registry).labels("get")
    for value in (0.05, 0.1000001, 0.3, 0.75, 2.0, 3.0):
        child.observe(value)
    assert [_bucket(registry, le) for le in ("0.1", "0.5", "1.0", "+Inf")] == [1, 3, 4, 6]
    assert registry.get_sample_value("t_seconds_count", {"op": "get"}) == 6
    assert registry.get_sample_value("t_seconds_sum", {"op": "get"}) == pytest.approx(6.2000001)
    assert child.count == 6


def test_label_sets_are_separate_series() -> None:
    registry = CollectorRegistry()
    histogram = _histogram(registry)
    assert histogram.labels("get") is histogram.labels("get")
    histogram.labels("get").observe(0.2)
    histogram.labels("set").observe(0.2)
    histogram.labels("set").observe(0.2)
    assert registry.get_sample_value("t_seconds_count", {"op": "get"}) == 1
    assert registry.get_sample_value("t_seconds_count", {"op": "set"}) == 2


def test_inf_is_appended_once() -> None:
    registry = CollectorRegistry()
    assert _histogram(registry).bounds == (0.1, 0.5, 1.0, math.inf)
    other = CollectorRegistry()
    assert _histogram(other, (0.1, math.inf)).bounds == (0.1, math.inf)


@pytest.mark.parametrize(
    "buckets",
    [(), (0.5, 0.1), (0.1, 0.1), (0.1, math.inf, 1.0), (math.nan,)],
    ids=["empty", "decreasing", "repeated", "inf-not-last", "nan"],
)
def test_bad_buckets_raise(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="buckets"):
        _histogram(CollectorRegistry(), buckets)


def test_wrong_label_count_raises() -> None:
    registry = CollectorRegistry()
    histogram = _histogram(registry)
    counter = PlainCounter("t_total", "Test count.", ["a", "b"], registry=registry)
    with pytest.raises(ValueError, match="labels"):
        histogram.labels()
    with pytest.raises(ValueError, match="labels"):
        histogram.labels("get", "extra")
    with pytest.raises(ValueError, match="labels"):
        counter.labels("a")


def _families(registry: CollectorRegistry) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Samples by family, parsed back from the text format, less prometheus_client's
    `_created` series (which the plain metrics do not expose)."""
    text = generate_latest(registry).decode()
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
        if not f.name.endswith("_created")
    }


@pytest.mark.parametrize("buckets", [BUCKETS, Histogram.DEFAULT_BUCKETS])
def test_exposition_matches_prometheus_client(buckets: tuple[float, ...]) -> None:
    plain, reference = CollectorRegistry(), CollectorRegistry()
    ours = _histogram(plain, buckets)
    theirs = Histogram("t_seconds", "Test time.", ["op"], registry=reference, buckets=buckets)
    for op in ("get", "set"):
        for value in OBSERVED if op == "get" else OBSERVED[::3]:
            ours.labels(op).observe(value)
            theirs.labels(op).observe(value)
    got, want = _families(plain), _families(reference)
    assert any(name == "t_seconds_bucket" for name, _, _ in want["t_seconds"])
    assert got == want
    assert (
        generate_latest(plain).decode().splitlines()[:2]
        == generate_latest(reference).decode().splitlines()[:2]
    )  # HELP and TYPE


def test_counter_exposition_matches_prometheus_client() -> None:
    plain, reference = CollectorRegistry(), CollectorRegistry()
    ours = PlainCounter("t_total", "Test count.", ["a"], registry=plain)
    theirs = Counter("t_total", "Test count.", ["a"], registry=reference)
    for a, n in (("x", 1), ("y", 3), ("x", 2)):
        ours.labels(a).inc(n)
        theirs.labels(a).inc(n)
    assert _families(plain) == _families(reference)
