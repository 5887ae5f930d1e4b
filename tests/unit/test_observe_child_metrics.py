"""`metrics.child`: a remembered labelled child counts into the registry like `labels()`."""

from __future__ import annotations

from tenfold.observe import metrics


def test_child_is_remembered_and_counts_into_the_registry() -> None:
    labels = {"topic": "child.test", "group": "g", "outcome": "ok"}
    before = metrics.REGISTRY.get_sample_value("tenfold_events_handled_total", labels) or 0.0
    first = metrics.child(metrics.events_handled, "child.test", "g", "ok")
    assert metrics.child(metrics.events_handled, "child.test", "g", "ok") is first
    assert metrics.child(metrics.events_handled, "child.test", "g", "retry") is not first
    first.inc()
    metrics.events_handled.labels("child.test", "g", "ok").inc()  # the same series
    after = metrics.REGISTRY.get_sample_value("tenfold_events_handled_total", labels)
    assert after == before + 2
