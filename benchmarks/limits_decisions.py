"""Rate-limit decisions per second: tenfold's Redis GCRA against the `limits` library.

Measured: decisions/s of `RedisStorage.decide` (one EVALSHA of gcra.lua per
decision) against `limits`' async Redis storage with its moving-window and
sliding-window-counter strategies (`hit()`), on the same Redis in the same run.
Each request picks one of 10,000 users (fixed seed, the same list for every
side), rule "100/second" per user, so nearly all requests are allowed and
every side does its full work. Concurrency 1 (one awaiting loop) and 64
(64 asyncio tasks sharing the requests). `limits` gets a 64-connection pool
and runs with its default client (coredis) and with redis-py; tenfold uses its
own client (`tenfold.resp`), whose one socket pipelines concurrent calls.
Rounds alternate the order of the sides; medians are reported.
Every side runs on the same event loop, uvloop (what `tenfold up` serves on).
Why it matters at concurrency 1: there a decision is one round trip, and the
default asyncio loop adds ~25 µs of Python (selector, handles, two loop passes)
to every side's round trip; that fixed cost narrows the ratio without saying
anything about the clients (uvloop lowers the floor of an asyncio GET round
trip to this Redis from ~50 µs to ~23 µs).
Redis: `TENFOLD_BENCH_REDIS_URL` (default redis://127.0.0.1:6379/0); keys use
run-unique prefixes and are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from rich.table import Table

from benchmarks._common import calls_per_s, delete_redis_keys, median, rate, redis_url
from benchmarks._common import main as run_main
from tenfold.limits import Rule
from tenfold.limits.redis import RedisStorage

SEED = 20240604
USERS = 10_000
CONCURRENCY = (1, 64)
TENFOLD = "tenfold GCRA"
GOAL = 2.0

Decide = Callable[[str], Awaitable[Any]]


async def _sides(url: str, prefix: str) -> tuple[dict[str, Decide], list[Any]]:
    from limits import parse
    from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
    from limits.storage import storage_from_string

    rule = Rule(limit=100, period_s=1.0)
    tenfold = RedisStorage(url, prefix=f"{prefix}:tf:", timeout_s=5.0)
    item = parse("100/second")
    sides: dict[str, Decide] = {TENFOLD: lambda subject: tenfold.decide(subject, rule)}
    closers: list[Any] = [tenfold]
    for impl in ("coredis", "redispy"):
        storage = storage_from_string(
            "async+" + url,
            key_prefix=f"{prefix}:lim-{impl}",
            max_connections=64,
            implementation=impl,
        )
        label = "" if impl == "coredis" else " (redis-py)"
        moving = MovingWindowRateLimiter(storage)
        counter = SlidingWindowCounterRateLimiter(storage)
        sides[f"limits moving-window{label}"] = lambda s, m=moving: m.hit(item, s)
        sides[f"limits sliding-window-counter{label}"] = lambda s, c=counter: c.hit(item, s)
    return sides, closers


async def _cleanup(url: str, prefix: str, closers: list[Any]) -> None:
    for closer in closers:
        await closer.close()
    await delete_redis_keys(url, [f"{prefix}:*"])


async def _run(quick: bool) -> dict[str, Any]:
    n, rounds = (2_000, 3) if quick else (20_000, 5)
    rng = random.Random(SEED)
    subjects = [f"user{rng.randrange(USERS)}" for _ in range(n)]
    url = redis_url()
    prefix = f"tfbench-{uuid.uuid4().hex[:8]}"
    sides, closers = await _sides(url, prefix)
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        for side in sides.values():  # warm up: connections, script load
            await asyncio.gather(*(side(f"warm{i}") for i in range(64)))
        for concurrency in CONCURRENCY:
            per_side: dict[str, list[float]] = {name: [] for name in sides}
            for r in range(rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for name in order:
                    per_side[name].append(await calls_per_s(sides[name], subjects, concurrency))
            samples[str(concurrency)] = per_side
    finally:
        await _cleanup(url, prefix, closers)
    ratios = {
        c: {
            name: median(per_side[TENFOLD]) / median(values)
            for name, values in per_side.items()
            if name != TENFOLD
        }
        for c, per_side in samples.items()
    }
    return {
        "requests_per_round": n,
        "rounds": rounds,
        "users": USERS,
        "seed": SEED,
        "rule": "100/second per user",
        "redis_url": url,
        "event_loop": "uvloop (every side)",
        "decisions_per_s_rounds": samples,
        "decisions_per_s_median": {
            c: {name: median(v) for name, v in per_side.items()} for c, per_side in samples.items()
        },
        "ratio_tenfold_vs": ratios,
        "goal_ratio": GOAL,
        "goal_met": all(r >= GOAL for by in ratios.values() for r in by.values()),
    }


def run(quick: bool) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_run(quick))


def render(result: dict[str, Any]) -> Table:
    table = Table(
        title=(
            f"Rate-limit decisions on one Redis: {result['requests_per_round']:,} requests over "
            f"{result['users']:,} users, median of {result['rounds']} rounds"
        ),
        caption=(
            f"ratio = tenfold / side (medians); goal ≥ {result['goal_ratio']:g}x against every "
            f"side: {'met' if result['goal_met'] else 'NOT met'}"
        ),
    )
    for column in ("concurrency", "side", "decisions/s", "min..max", "tenfold / side"):
        table.add_column(column, justify="left" if column == "side" else "right", no_wrap=True)
    for concurrency, per_side in result["decisions_per_s_rounds"].items():
        for name, values in per_side.items():
            ratio = result["ratio_tenfold_vs"][concurrency].get(name)
            table.add_row(
                concurrency,
                name,
                rate(median(values)),
                f"{rate(min(values))}..{rate(max(values))}",
                "—" if ratio is None else f"{ratio:.2f}x",
            )
    return table


if __name__ == "__main__":
    raise SystemExit(run_main("limits_decisions", __doc__ or "", run, render))
