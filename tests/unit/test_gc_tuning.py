"""tenfold.gateway.heap: the collector settings a serving process gets after start-up."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tenfold.config import Settings
from tenfold.errors import ConfigError
from tenfold.gateway import heap


@pytest.fixture
def pristine_gc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    threshold = gc.get_threshold()
    gc.unfreeze()
    monkeypatch.setattr(heap, "_frozen", False)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_freezes_the_start_up_heap_and_raises_the_young_threshold(pristine_gc: None) -> None:
    start_up = [{"route": i} for i in range(1000)]  # stands for the app's long-lived heap
    assert gc.get_freeze_count() == 0
    assert heap.tune_gc(20_000) is True
    assert gc.get_freeze_count() >= len(start_up)
    assert gc.get_threshold()[0] == 20_000
    assert gc.get_threshold()[1:] == (10, 10)  # the older generations keep CPython's ratios


def test_freezes_once_per_process(pristine_gc: None) -> None:
    heap.tune_gc(20_000)
    frozen = gc.get_freeze_count()
    later = [{"request": i} for i in range(1000)]  # a second app started in the same process
    heap.tune_gc(5_000)
    assert gc.get_freeze_count() == frozen, "a second start-up must not freeze more"
    assert gc.get_threshold()[0] == 5_000
    assert later


def test_zero_leaves_the_collector_alone(pristine_gc: None) -> None:
    before = gc.get_threshold()
    assert heap.tune_gc(0) is False
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_cycles_made_after_start_up_are_still_collected(pristine_gc: None) -> None:
    heap.tune_gc(20_000)

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    del a, b
    assert gc.collect() >= 2


@pytest.mark.parametrize("value", ["-1", "10000001"])
def test_out_of_range_threshold_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TENFOLD_GC_GEN0_THRESHOLD", value)
    with pytest.raises(ConfigError, match="TENFOLD_GC_GEN0_THRESHOLD"):
        Settings()
