"""L1Cache: bounds by entry count and by bytes, TTL on a fake clock, LRU order, tags."""

from __future__ import annotations

import pytest

from tenfold.cache import L1Cache
from tenfold.errors import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bounded_by_entries_evicts_least_recently_used() -> None:
    l1 = L1Cache(max_entries=3, max_bytes=1000, clock=FakeClock())
    for key in "abc":
        assert l1.put(key, b"x", 10)
    assert l1.get("a") == b"x"  # a becomes the most recent: b is now the LRU
    l1.put("d", b"x", 10)
    assert len(l1) == 3
    assert "b" not in l1
    assert [k for k in "acd" if l1.get(k) is not None] == ["a", "c", "d"]
    assert l1.evictions == 1


def test_bounded_by_total_bytes() -> None:
    l1 = L1Cache(max_entries=100, max_bytes=10, clock=FakeClock())
    l1.put("a", b"1234", 10)
    l1.put("b", b"1234", 10)
    assert l1.total_bytes == 8
    l1.put("c", b"1234", 10)  # 12 > 10: a (LRU) goes
    assert "a" not in l1 and "b" in l1 and "c" in l1
    assert l1.total_bytes == 8
    assert not l1.put("huge", b"x" * 11, 10)  # bigger than the whole bound: not stored
    assert "huge" not in l1 and l1.total_bytes == 8
    l1.put("b", b"12", 10)  # replacing accounts the new size
    assert l1.total_bytes == 6


def test_ttl_on_fake_clock() -> None:
    clock = FakeClock()
    l1 = L1Cache(clock=clock)
    l1.put("k", b"v", 5)
    clock.now += 4.999
    assert l1.get("k") == b"v"
    clock.now += 0.001
    assert l1.get("k") is None
    assert len(l1) == 0 and l1.total_bytes == 0
    assert not l1.put("z", b"v", 0)  # a non-positive TTL stores nothing


def test_delete_tag_and_clear() -> None:
    l1 = L1Cache(clock=FakeClock())
    l1.put("a", b"1", 10, ["t1"])
    l1.put("b", b"2", 10, ["t1", "t2"])
    l1.put("c", b"3", 10, ["t2"])
    assert l1.delete_tag("t1") == 2
    assert "a" not in l1 and "b" not in l1 and "c" in l1
    assert l1.delete("c") and not l1.delete("c")
    l1.put("d", b"4", 10)
    l1.clear()
    assert len(l1) == 0 and l1.total_bytes == 0


@pytest.mark.parametrize("options", [{"max_entries": 0}, {"max_bytes": 0}])
def test_bounds_are_validated(options: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        L1Cache(**options)


def test_meta_is_kept_and_its_bytes_count() -> None:
    l1 = L1Cache(max_entries=10, max_bytes=20, clock=FakeClock())
    meta = object()
    assert l1.put("a", b"1234", 10, meta=meta, meta_bytes=6)
    entry = l1.entry("a")
    assert entry is not None and entry.meta is meta and entry.payload == b"1234"
    assert l1.total_bytes == 10
    assert l1.put("b", b"1234", 10, meta=meta, meta_bytes=6)
    assert l1.put("c", b"12", 10)  # 22 > 20: a (LRU) goes
    assert "a" not in l1 and l1.total_bytes == 12
    assert not l1.put("d", b"1", 10, meta=meta, meta_bytes=20)  # too big with its meta
    l1.delete("b")
    assert l1.total_bytes == 2 and l1.entry("missing") is None
