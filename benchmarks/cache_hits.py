"""Cache hits per second: tenfold's TieredCache against cashews, L1 and L2, on one Redis.

Measured, in one run on the same Redis, at concurrency 1 (one awaiting loop)
and 64 (64 asyncio tasks sharing the reads):

- L1 hits/s: `TieredCache.get_or_load` on 1,000 hot keys, every read answered
  by the in-process L1 (L2 is Redis, loaded beforehand), against cashews'
  in-process options: `cache.setup("mem://")` `get`, and cashews' client-side
  cached Redis (`setup("redis://...", client_side=True)`: a local memory tier
  kept coherent by Redis invalidation messages, the closest peer to an L1 over
  Redis with invalidation), each read served from its local tier after a
  warm-up read. Goal: tenfold ≥ 3x every peer.
- L2 hits/s: `get_or_load` with an L1 of one entry (`L1Cache(max_entries=1)`,
  the smallest it allows) over 10,000 keys read in a fixed random order, so
  nearly every read is a Redis GET (the fraction answered by Redis is measured
  from tenfold's own hit counters and reported), against cashews `redis://`
  `get` on the same number of keys. Goal: tenfold ≥ 1.5x.

Why it is fair: the same value (a ~200-byte dict) for every side, stored by
each library itself beforehand; the same key sequence (fixed seed); cashews uses
redis-py with hiredis and a 64-connection blocking pool, tenfold its own
auto-pipelined RESP client on one socket (`tenfold.resp`, hiredis parser); rounds
alternate the order of the sides and medians are reported. Every side runs on
the same event loop, uvloop (what `tenfold up` serves on): at concurrency 1 an
L2 hit is one round trip, and the default asyncio loop would add the same
~25 µs of loop overhead to every side's. tenfold does more
per hit than cashews: it returns a private copy of the value (decoded from JSON
on every hit), while cashews' memory tiers return the stored object itself, and
tenfold checks freshness, stale and fail-safe windows and early refresh.
Redis: `TENFOLD_BENCH_REDIS_URL` (default redis://127.0.0.1:6379/0); keys use
run-unique prefixes and are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from rich.table import Table

from benchmarks._common import calls_per_s, delete_redis_keys, median, rate, redis_url
from benchmarks._common import main as run_main

SEED = 20240607
CONCURRENCY = (1, 64)
POOL = 64
HOT_KEYS = 1_000
L2_KEYS = 10_000
TENFOLD_L1 = "tenfold L1"
TENFOLD_L2 = "tenfold L2"
GOALS = {"l1": 3.0, "l2": 1.5}
VALUE = {
    "id": 1234567,
    "name": "room of the week",
    "owner": "user:8842",
    "members": [101, 102, 103, 104, 105, 106, 107, 108],
    "topic": "tiered caching, stampedes and why the L1 should stay cheap",
    "open": True,
    "score": 98.5,
}

Get = Callable[[str], Awaitable[Any]]


async def _load() -> dict[str, Any]:
    raise AssertionError("a benchmark read missed: every key was stored beforehand")


async def _tenfold(url: str, prefix: str, names: list[str], l1_entries: int) -> tuple[Get, Any]:
    from tenfold.cache import L1Cache, TieredCache
    from tenfold.cache.redis import RedisL2

    cache = TieredCache(
        L1Cache(max_entries=l1_entries),
        RedisL2(url, timeout_s=5.0),
        prefix=prefix,
        ttl_s=3600,
        l1_max_ttl_s=3600,
    )
    report = await cache.warm({name: VALUE for name in names})
    assert report.stored == len(names) and not report.failed, report

    def get(key: str) -> Awaitable[Any]:
        return cache.get_or_load(key, _load)

    return get, cache


async def _cashews(url: str, prefix: str, names: list[str], **options: Any) -> tuple[Get, Any]:
    from cashews import Cache

    cache = Cache()
    cache.setup(url, **options)
    for name in names:
        await cache.set(f"{prefix}:{name}", VALUE, expire=3600)

    def get(key: str) -> Awaitable[Any]:
        return cache.get(f"{prefix}:{key}")

    return get, cache


async def _measure(
    sides: dict[str, Get], keys: list[str], rounds: int
) -> dict[str, dict[str, list[float]]]:
    for name, get in sides.items():  # warm up: connections, local tiers
        values = await asyncio.gather(*(get(k) for k in keys[:POOL]))
        assert all(v == VALUE for v in values), f"{name} does not return the stored value"
        for key in set(keys):
            await get(key)
    samples: dict[str, dict[str, list[float]]] = {}
    for concurrency in CONCURRENCY:
        per_side: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                per_side[name].append(await calls_per_s(sides[name], keys, concurrency))
        samples[str(concurrency)] = per_side
    return samples


def _ratios(samples: dict[str, dict[str, list[float]]], ours: str) -> dict[str, dict[str, float]]:
    return {
        c: {
            name: median(per_side[ours]) / median(values)
            for name, values in per_side.items()
            if name != ours
        }
        for c, per_side in samples.items()
    }


async def _cleanup(url: str, prefixes: list[str], closers: list[Any]) -> None:
    for closer in closers:
        await closer.close()
    await delete_redis_keys(url, [f"*{prefix}*" for prefix in prefixes])


def _l2_fraction(prefix: str) -> float:
    from tenfold.observe.metrics import REGISTRY

    def hits(tier: str) -> float:
        value = REGISTRY.get_sample_value(
            "tenfold_cache_hits_total", {"cache": prefix, "tier": tier}
        )
        return value or 0.0

    total = hits("l1") + hits("l2")
    return hits("l2") / total if total else 0.0


async def _run(quick: bool) -> dict[str, Any]:
    l1_reads, l2_reads, rounds = (20_000, 3_000, 3) if quick else (200_000, 20_000, 5)
    rng = random.Random(SEED)
    hot = [f"room:{i}" for i in range(HOT_KEYS)]
    many = [f"room:{i}" for i in range(L2_KEYS)]
    l1_keys = [hot[rng.randrange(HOT_KEYS)] for _ in range(l1_reads)]
    l2_keys = [many[rng.randrange(L2_KEYS)] for _ in range(l2_reads)]
    url = redis_url()
    run_id = uuid.uuid4().hex[:8]
    prefixes = [f"tfbench-{run_id}-{side}" for side in ("l1", "l2", "cmem", "ccs", "credis")]
    p_l1, p_l2, p_mem, p_cs, p_redis = prefixes
    closers: list[Any] = []
    try:
        tf_l1, cache = await _tenfold(url, p_l1, hot, 10_000)
        closers.append(cache)
        c_mem, cache = await _cashews("mem://", p_mem, hot, size=10_000)
        closers.append(cache)
        c_cs, cache = await _cashews(
            url, p_cs, hot, client_side=True, max_connections=POOL, socket_timeout=5
        )
        closers.append(cache)
        l1 = await _measure(
            {
                TENFOLD_L1: tf_l1,
                "cashews mem://": c_mem,
                "cashews redis client_side": c_cs,
            },
            l1_keys,
            rounds,
        )
        tf_l2, cache = await _tenfold(url, p_l2, many, 1)
        closers.append(cache)
        c_redis, cache = await _cashews(url, p_redis, many, max_connections=POOL, socket_timeout=5)
        closers.append(cache)
        l2 = await _measure({TENFOLD_L2: tf_l2, "cashews redis://": c_redis}, l2_keys, rounds)
        l2_fraction = _l2_fraction(p_l2)
    finally:
        await _cleanup(url, prefixes, closers)
    figures: dict[str, Any] = {
        "rounds": rounds,
        "seed": SEED,
        "value_bytes_json": len(orjson.dumps(VALUE)),
        "redis_url": url,
        "event_loop": "uvloop (every side)",
        "pool": POOL,
    }
    for tier, samples, ours, reads, keys in (
        ("l1", l1, TENFOLD_L1, l1_reads, HOT_KEYS),
        ("l2", l2, TENFOLD_L2, l2_reads, L2_KEYS),
    ):
        ratios = _ratios(samples, ours)
        figures[tier] = {
            "reads_per_round": reads,
            "keys": keys,
            "reads_per_s_rounds": samples,
            "reads_per_s_median": {
                c: {name: median(v) for name, v in per_side.items()}
                for c, per_side in samples.items()
            },
            "ratio_tenfold_vs": ratios,
            "goal_ratio": GOALS[tier],
            "goal_met": all(r >= GOALS[tier] for by in ratios.values() for r in by.values()),
        }
    figures["l2"]["tenfold_reads_answered_by_l2_fraction"] = l2_fraction
    return figures


def run(quick: bool) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_run(quick))


def render(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"Cache hits/s on one Redis, median of {result['rounds']} rounds",
        caption=(
            "ratio = tenfold / side (medians); goals: L1 ≥ "
            f"{result['l1']['goal_ratio']:g}x ({'met' if result['l1']['goal_met'] else 'NOT met'})"
            f", L2 ≥ {result['l2']['goal_ratio']:g}x "
            f"({'met' if result['l2']['goal_met'] else 'NOT met'}); tenfold L2 reads answered "
            f"by Redis: {result['l2']['tenfold_reads_answered_by_l2_fraction']:.1%}"
        ),
    )
    for column in ("tier", "concurrency", "side", "reads/s", "min..max", "tenfold / side"):
        table.add_column(column, justify="left" if column == "side" else "right", no_wrap=True)
    for tier in ("l1", "l2"):
        part = result[tier]
        for concurrency, per_side in part["reads_per_s_rounds"].items():
            for name, values in per_side.items():
                ratio = part["ratio_tenfold_vs"][concurrency].get(name)
                table.add_row(
                    tier.upper(),
                    concurrency,
                    name,
                    rate(median(values)),
                    f"{rate(min(values))}..{rate(max(values))}",
                    "—" if ratio is None else f"{ratio:.2f}x",
                )
    return table


def goal_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for tier, label in (("l1", "L1 hits"), ("l2", "L2 hits")):
        part = result[tier]
        worst = min(r for by in part["ratio_tenfold_vs"].values() for r in by.values())
        met = "met" if part["goal_met"] else "NOT met"
        lines.append(
            f"cache {label} ≥ {part['goal_ratio']:g}x cashews at every concurrency: {met} "
            f"(worst {worst:.2f}x)"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(run_main("cache_hits", __doc__ or "", run, render))
