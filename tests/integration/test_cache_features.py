"""TieredCache, issue 4's remaining parts: early refresh, the cluster lock, warming, metrics.

Runs over a memory and a Redis L2 (the `make_node` fixture of test_cache_tiered),
plus Redis-only cases: two OS processes sharing the lock, a dead Redis.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from tenfold.cache import L1Cache, L2Backend, MemoryL2, TieredCache
from tenfold.cache.redis import RedisL2
from tenfold.errors import CacheError, ConfigError
from tenfold.observe.metrics import REGISTRY
from tests.integration import test_cache_tiered as tiered
from tests.integration.support import wait_until
from tests.integration.test_cache_tiered import MakeNode, Node, Source, _delete_prefix, _settle

make_node = tiered.make_node  # the fixture: nodes over a memory and a Redis L2

LOCK_PEER = Path(__file__).with_name("cache_lock_peer.py")


class TimedSource(Source):
    """A loader whose load takes `load_s` on the node's fake clock (XFetch's delta)."""

    def __init__(self, node: Node, value: Any, load_s: float, delay_s: float = 0.0) -> None:
        super().__init__(value, delay_s)
        self.node = node
        self.load_s = load_s

    async def __call__(self) -> Any:
        self.node.clock.now += self.load_s
        return await super().__call__()


def triggered(node: Node, key: str) -> bool:
    return node.cache._full_key(key) in node.cache._flights


async def cancel_flights(node: Node) -> None:
    for task in list(node.cache._flights.values()):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- probabilistic early refresh --------------------------------------------------


async def test_early_refresh_fires_exactly_as_xfetch_says(make_node: MakeNode) -> None:
    node = make_node(ttl_s=100, early_refresh_beta=1.0, random=lambda: 0.5)
    source = TimedSource(node, "v1", load_s=2.0)
    assert await node.cache.get_or_load("k", source) == "v1"
    fresh_until = node.clock.now + 100
    # refresh iff now - 2 * 1 * ln(0.5) >= fresh_until, i.e. within 2 ln 2 = 1.386 s of it
    node.clock.now = fresh_until - 1.5
    assert await node.cache.get_or_load("k", source) == "v1"
    assert not triggered(node, "k")
    node.clock.now = fresh_until - 1.3
    assert await node.cache.get_or_load("k", source) == "v1"  # served at once, refresh behind
    assert triggered(node, "k")
    await _settle(node.cache)
    assert source.calls == 2
    raw = await node.cache.l2.get(node.cache._full_key("k"))
    assert raw is not None and orjson.loads(raw)[0] > fresh_until  # the refresh landed


async def test_early_refresh_probability_rises_near_expiry(make_node: MakeNode) -> None:
    rng = random.Random(4)
    node = make_node(ttl_s=100, random=rng.random)
    source = TimedSource(node, "v", load_s=2.0)
    await node.cache.get_or_load("k", source)
    fresh_until = node.clock.now + 100

    async def fraction(gap_s: float, trials: int = 400) -> float:
        node.clock.now = fresh_until - gap_s
        fired = 0
        for _ in range(trials):
            await node.cache.get_or_load("k", source)
            if triggered(node, "k"):
                fired += 1
                await cancel_flights(node)
        return fired / trials

    # P(refresh) = exp(-gap / (delta * beta)) with delta = 2 s, beta = 1
    near, middle, far = await fraction(1.0), await fraction(6.0), await fraction(30.0)
    assert abs(near - math.exp(-0.5)) < 0.08, near
    assert abs(middle - math.exp(-3)) < 0.04, middle
    assert far == 0.0
    assert source.calls == 1  # every triggered refresh was cancelled before it ran


async def test_early_refresh_off_with_beta_zero_or_unknown_load_time(make_node: MakeNode) -> None:
    off = make_node(ttl_s=100, early_refresh_beta=0.0, random=lambda: 1e-12)
    await off.cache.get_or_load("k", TimedSource(off, "v", load_s=50.0))
    off.clock.now += 99.9
    await off.cache.get_or_load("k", Source("unused"))
    assert not triggered(off, "k")
    # an entry written before load_s existed (5 fields) decodes, and never refreshes early
    node = make_node(ttl_s=100, random=lambda: 1e-12)
    now = node.clock.now
    old = orjson.dumps([now + 1, now + 1, now + 1, {"old": True}, []])
    await node.cache.l2.set(node.cache._full_key("old"), old, 60)
    source = Source("unused")
    assert await node.cache.get_or_load("old", source) == {"old": True}
    assert not triggered(node, "old") and source.calls == 0


async def test_many_callers_triggering_early_refresh_load_once(make_node: MakeNode) -> None:
    # -ln 0.01 = 4.6: fires within 9.2 s of expiry; L1 holds the entry all along
    node = make_node(ttl_s=100, l1_max_ttl_s=1000, random=lambda: 0.01)
    source = TimedSource(node, {"v": 1}, load_s=2.0)
    await node.cache.get_or_load("k", source)
    node.clock.now += 95
    source.value, source.delay_s = {"v": 2}, 0.05
    results = await asyncio.gather(*(node.cache.get_or_load("k", source) for _ in range(300)))
    assert results == [{"v": 1}] * 300  # nobody waited for the refresh
    await _settle(node.cache)
    assert source.calls == 2
    assert await node.cache.get_or_load("k", source) == {"v": 2}


# -- cluster-wide single-flight -------------------------------------------------


@pytest.mark.parametrize("l2", ["memory", "redis"])
async def test_lock_is_released_only_by_its_owner(l2: str, request: pytest.FixtureRequest) -> None:
    backend: L2Backend = (
        MemoryL2() if l2 == "memory" else RedisL2(request.getfixturevalue("redis_url"))
    )
    key = f"tflock:{uuid.uuid4().hex}"
    try:
        assert await backend.try_lock(key, "a", 5.0) is True
        assert await backend.try_lock(key, "b", 5.0) is False
        assert await backend.unlock(key, "b") is False  # not the owner: still held
        assert await backend.try_lock(key, "b", 5.0) is False
        assert await backend.unlock(key, "a") is True
        assert await backend.try_lock(key, "b", 0.05) is True
        await asyncio.sleep(0.1)  # b's lease expires: the lock is free again
        assert await backend.try_lock(key, "c", 5.0) is True
        assert await backend.unlock(key, "b") is False
        assert await backend.unlock(key, "c") is True
    finally:
        await backend.close()


async def test_two_caches_share_one_load(make_node: MakeNode) -> None:
    a = make_node(cluster_lock=True, lock_ttl_s=5.0)
    b = make_node(cluster_lock=True, lock_ttl_s=5.0)
    source = Source({"id": 7}, delay_s=0.2)
    results = await asyncio.gather(
        *(node.cache.get_or_load("cold", source) for _ in range(500) for node in (a, b))
    )
    assert source.calls == 1
    assert results == [{"id": 7}] * 1000
    assert a.cache._full_key("cold") in a.cache.l1 and b.cache._full_key("cold") in b.cache.l1


async def test_without_the_lock_each_cache_loads(make_node: MakeNode) -> None:
    a, b = make_node(), make_node()  # the control: per-process single-flight only
    source = Source("v", delay_s=0.1)
    await asyncio.gather(*(n.cache.get_or_load("cold", source) for _ in range(50) for n in (a, b)))
    assert source.calls == 2


async def test_a_hung_lock_holder_is_taken_over_after_the_lease(make_node: MakeNode) -> None:
    a = make_node(cluster_lock=True, lock_ttl_s=0.3, hard_timeout_s=60)
    b = make_node(cluster_lock=True, lock_ttl_s=0.3)
    hung = Source("never", delay_s=60)  # the holder's loader never finishes
    holder = asyncio.create_task(a.cache.get_or_load("k", hung))
    await wait_until(lambda: hung.calls == 1, timeout_s=5, what="the holder's loader")
    source = Source("from b")
    started = time.monotonic()
    results = await asyncio.gather(*(b.cache.get_or_load("k", source) for _ in range(100)))
    waited = time.monotonic() - started
    assert results == ["from b"] * 100 and source.calls == 1
    assert 0.2 <= waited < 2.0, waited  # b waited out the 0.3 s lease, then loaded once
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder


async def test_a_crashed_process_lock_expires_and_one_waiter_takes_over(redis_url: str) -> None:
    prefix = f"tfcache:{uuid.uuid4().hex[:10]}"
    caches = [
        TieredCache(L1Cache(), RedisL2(redis_url, timeout_s=2.0), prefix=prefix,
                    cluster_lock=True, lock_ttl_s=0.6)
        for _ in range(2)
    ]  # fmt: skip
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        for cache in caches:  # connected before the lease starts running
            await cache.start()
            await asyncio.gather(*(cache.l2.get(f"{prefix}:warm") for _ in range(64)))
        # a process that took the lock and died: nobody will ever release it
        assert await client.set(f"{prefix}:l:k", "dead", nx=True, px=300)
        source = Source("loaded", delay_s=0.2)
        started = time.monotonic()
        results = await asyncio.gather(
            *(cache.get_or_load("k", source) for _ in range(100) for cache in caches)
        )
        assert results == ["loaded"] * 200
        assert source.calls == 1  # the first waiter to see the lease end took it over
        assert time.monotonic() - started >= 0.25
        took_over = REGISTRY.get_sample_value(
            "tenfold_cache_lock_total", {"cache": prefix, "outcome": "took_over"}
        )
        assert took_over == 1.0
    finally:
        await client.aclose()
        for cache in caches:
            await cache.close()
        await _delete_prefix(redis_url, prefix)


async def test_redis_down_loads_locally_with_the_lock_on() -> None:
    cache = TieredCache(
        L1Cache(), RedisL2("redis://127.0.0.1:1/0", timeout_s=0.2), prefix="tfdownlock",
        cluster_lock=True,
    )  # fmt: skip
    try:
        source = Source("local", delay_s=0.05)
        started = time.monotonic()
        results = await asyncio.gather(*(cache.get_or_load("k", source) for _ in range(50)))
        assert results == ["local"] * 50 and source.calls == 1
        assert time.monotonic() - started < 1.0
        assert REGISTRY.get_sample_value(
            "tenfold_cache_lock_total", {"cache": "tfdownlock", "outcome": "unknown"}
        )
    finally:
        await cache.close()


async def test_two_processes_share_one_load(redis_url: str, tmp_path: Path) -> None:
    prefix = f"tfcache:{uuid.uuid4().hex[:10]}"
    calls = tmp_path / "calls.txt"
    calls.touch()
    peer = await asyncio.create_subprocess_exec(
        sys.executable, str(LOCK_PEER), redis_url, prefix, "cold", str(calls), "500",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    cache = TieredCache(
        L1Cache(), RedisL2(redis_url, timeout_s=2.0), prefix=prefix, cluster_lock=True
    )

    async def load() -> dict[str, str]:
        with calls.open("a") as f:
            f.write("test\n")
        await asyncio.sleep(0.3)
        return {"loaded_by": "a process"}

    try:
        assert peer.stdout is not None and peer.stdin is not None
        await cache.start()
        async with asyncio.timeout(15):
            assert (await peer.stdout.readline()).split() == [b"ready"]
        peer.stdin.write(b"go\n")
        await peer.stdin.drain()
        results = await asyncio.gather(*(cache.get_or_load("cold", load) for _ in range(500)))
        async with asyncio.timeout(15):
            assert (await peer.stdout.readline()).split() == [b"done", b"1"]
            assert await peer.wait() == 0
        assert results == [{"loaded_by": "a process"}] * 500
        assert len(calls.read_text().splitlines()) == 1  # one load for the whole "cluster"
    finally:
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
        await cache.close()
        await _delete_prefix(redis_url, prefix)


async def test_lock_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="lock_ttl_s"):
        TieredCache(L1Cache(), MemoryL2(), prefix="p", lock_ttl_s=0)
    with pytest.raises(ConfigError, match="early_refresh_beta"):
        TieredCache(L1Cache(), MemoryL2(), prefix="p", early_refresh_beta=-1)


# -- warming ----------------------------------------------------------------------


async def test_warm_stores_values_and_fails_only_bad_keys(make_node: MakeNode) -> None:
    a = make_node(max_value_bytes=256, negative_ttl_s=0)
    b = make_node(max_value_bytes=256, negative_ttl_s=0)
    await b.cache.set("room:1", "old")
    assert await b.cache.get_or_load("room:1", Source("unused")) == "old"  # in b's L1
    bad = object()
    report = await a.cache.warm(
        {"room:1": {"id": 1}, "room:2": [2], "bad": bad, "big": "x" * 300, "none": None, "": 1}
    )
    assert report.stored == 2 and report.skipped == 1
    assert set(report.failed) == {"bad", "big", ""}
    assert all(isinstance(e, CacheError) for e in report.failed.values())
    assert report.failed["bad"].key == "bad"  # type: ignore[attr-defined]
    unused = Source("unused")

    async def b_sees_new() -> bool:
        return await b.cache.get_or_load("room:1", unused) == {"id": 1}

    await wait_until(b_sees_new, timeout_s=2, what="b's L1 copy dropped by the warm")
    assert await b.cache.get_or_load("room:2", unused) == [2]
    assert unused.calls == 0
    pairs = await a.cache.warm((f"p:{i}", i) for i in range(600))  # more than one pipeline
    assert pairs.stored == 600 and not pairs.failed
    assert await b.cache.get_or_load("p:599", unused) == 599 and unused.calls == 0
    again = await a.cache.warm([("p:1", -1), ("p:new", 1)], only_missing=True)
    assert (again.stored, again.skipped) == (1, 1)
    assert await a.cache.get_or_load("p:1", unused) == 1


async def test_warm_keys_loads_missing_keys_with_bounded_concurrency(make_node: MakeNode) -> None:
    node = make_node(max_value_bytes=256, negative_ttl_s=0)
    await node.cache.set("k3", "already here")
    in_flight = peak = 0
    loaded: list[str] = []

    async def load(key: str) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        loaded.append(key)
        if key == "k5":
            raise RuntimeError("row k5 is corrupt")
        if key == "k6":
            return {"not": {"json", "able"}}
        if key == "k7":
            return None
        return f"value of {key}"

    keys = [f"k{i}" for i in range(40)] + ["k1", "", "k" * 600]
    report = await node.cache.warm_keys(keys, load, concurrency=5)
    assert peak == 5
    assert sorted(loaded) == sorted(f"k{i}" for i in range(40) if i != 3)  # k1 once
    assert report.stored == 36  # 40 - k3 (fresh) - k5 - k6 - k7
    assert report.skipped == 2  # k3 already fresh, k7 None and not cached
    assert set(report.failed) == {"k5", "k6", "", "k" * 600}
    assert isinstance(report.failed["k5"], RuntimeError)
    assert isinstance(report.failed["k6"], CacheError)
    unused = Source("unused")
    assert await node.cache.get_or_load("k10", unused) == "value of k10"
    assert unused.calls == 0
    with pytest.raises(ConfigError, match="concurrency"):
        await node.cache.warm_keys(["x"], load, concurrency=0)
    second = await node.cache.warm_keys([f"k{i}" for i in range(10)], load)
    assert second.stored == 0 and second.skipped == 8 and len(second.failed) == 2


# -- metrics -----------------------------------------------------------------------


def sample(name: str, cache: TieredCache, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"cache": cache.prefix, **labels}) or 0.0


async def test_metrics_count_hits_misses_stale_and_fail_safe(make_node: MakeNode) -> None:
    a = make_node(ttl_s=10, stale_ttl_s=10, fail_safe_max_s=60, soft_timeout_s=0.05)
    b = make_node(ttl_s=10, stale_ttl_s=10, fail_safe_max_s=60, soft_timeout_s=0.05)
    cache = a.cache

    def counts(c: TieredCache) -> dict[str, float]:
        hits = {t: sample("tenfold_cache_hits_total", c, tier=t) for t in
                ("l1", "l2", "stale", "fail_safe")}  # fmt: skip
        misses = {f"miss_{t}": sample("tenfold_cache_misses_total", c, tier=t) for t in
                  ("l1", "l2")}  # fmt: skip
        return hits | misses

    zero = {"l1": 0, "l2": 0, "stale": 0, "fail_safe": 0, "miss_l1": 0, "miss_l2": 0}
    assert counts(cache) == zero
    source = Source("v1")
    await cache.get_or_load("k", source)  # cold: misses L1 and L2, loads
    assert counts(cache) == zero | {"miss_l1": 1, "miss_l2": 1}
    for _ in range(3):
        await cache.get_or_load("k", source)
    assert counts(cache) == zero | {"miss_l1": 1, "miss_l2": 1, "l1": 3}
    other = TieredCache(L1Cache(), MemoryL2(), prefix=cache.prefix + "-other")
    await other.get_or_load("k", Source("x"))  # another cache's counters: not ours
    assert counts(cache) == zero | {"miss_l1": 1, "miss_l2": 1, "l1": 3}
    assert counts(other)["miss_l2"] == 1
    a.clock.now += 15  # stale
    await cache.get_or_load("k", source)
    await _settle(cache)
    assert counts(cache)["stale"] == 1
    assert sample("tenfold_cache_refreshes_total", cache, kind="stale") == 1
    a.clock.now += 25  # expired, within fail-safe
    source.error = RuntimeError("database down")
    assert await cache.get_or_load("k", source) == "v1"
    assert counts(cache)["fail_safe"] == 1
    source.error = None
    before = counts(cache)
    await b.cache.get_or_load("k", source)  # b shares a's prefix, so a's counters
    assert counts(cache) == before | {"miss_l1": before["miss_l1"] + 1}  # L2 held one
    assert sample("tenfold_cache_l2_seconds_count", cache, op="get") >= 1
    assert sample("tenfold_cache_l2_seconds_count", cache, op="set") >= 1
    assert sample("tenfold_cache_loader_seconds_count", cache) >= 2


# -- the L1 hit path keeps its guarantees ----------------------------------------------


async def test_l1_hits_return_private_copies(make_node: MakeNode) -> None:
    cache = make_node().cache
    value = {"members": [1, 2], "name": "room"}
    await cache.set("k", value)
    first: dict[str, Any] = await cache.get_or_load("k", Source("unused"))
    first["members"].append(3)
    assert await cache.get_or_load("k", Source("unused")) == value
    assert await cache.get_or_load("s", Source("text")) == "text"
    entry = cache.l1.entry(cache._full_key("k"))
    assert entry is not None and entry.size > len(entry.payload)  # the copy is accounted
