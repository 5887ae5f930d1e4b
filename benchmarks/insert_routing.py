"""Routed insert throughput: `ShardedDatabase.shard_for(key)` against a bare asyncpg pool.

Measured: rows/s (and this process's CPU µs per row) of single-row `INSERT INTO
bench (slot, id, payload)`, 20,000 rows (2,000 with `--quick`) driven by 32
concurrent tasks taking a connection per row. Peer: a bare `asyncpg.create_pool`
on one database, `async with pool.acquire() as c: await c.execute(...)`; tenfold
with 1 and with 4 shards (databases on the same server), `async with
db.shard_for(user_id) as conn: await conn.execute(...)`. Goal of issue 2: routing
overhead (bare - tenfold_1) / bare at most 5%.

Why it is fair: same SQL text, rows, payload and concurrency; the bare pool and
each shard pool hold 16 connections, opened (min = max) and warmed before timing;
bare and tenfold's single shard share one database and table, truncated before
each timed run. Bare gets each row's slot precomputed; tenfold derives it from
the key (part of the routing cost). Rounds alternate bare, tenfold-1, tenfold-4;
medians are reported. The throwaway databases (`tfbench_<random>_*`, made through
`TENFOLD_BENCH_PG_URL`, default postgresql://postgres@127.0.0.1:5432/postgres,
always dropped) get `synchronous_commit = off`: the WAL flush wait is the same
for both sides, but on a shared disk it swings throughput by ±30% and would
hide a 5% difference.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from rich.table import Table

from benchmarks._common import console, median, sides_table
from benchmarks._common import main as run_main
from tenfold.config import Settings, ShardSpec, redact_url
from tenfold.data.router import ShardedDatabase
from tenfold.keyspace import slot_of

ADMIN_URL = os.environ.get("TENFOLD_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SQL = "INSERT INTO bench (slot, id, payload) VALUES ($1, $2, $3)"
TABLE = "CREATE TABLE IF NOT EXISTS bench (slot int NOT NULL, id bigint PRIMARY KEY, payload text)"
PAYLOAD = '{"kind":"message","body":"' + "lorem ipsum " * 8 + '"}'
POOL, TASKS, GOAL_PERCENT, PEER = 16, 32, 5.0, "bare asyncpg"
Row = tuple[str, int, int, str]  # key, slot, id, payload
Sample = tuple[float, float]  # rows/s, client CPU µs per row


def db_url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


def make_rows(n: int, first_id: int = 0) -> list[Row]:
    keys = (f"user:{i}" for i in range(first_id, first_id + n))
    return [(k, slot_of(k), first_id + i, PAYLOAD) for i, k in enumerate(keys)]


async def drive(insert: Callable[[Row], Awaitable[None]], rows: Sequence[Row]) -> Sample:
    """Insert `rows` with TASKS concurrent tasks; return rows/s and this process's CPU/row."""
    it = iter(rows)

    async def worker() -> None:
        for row in it:
            await insert(row)

    gc.collect()
    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return len(rows) / wall, cpu / len(rows) * 1e6


async def bare(url: str, rows: list[Row], warm: list[Row]) -> Sample:
    pool = await asyncpg.create_pool(url, min_size=POOL, max_size=POOL)

    async def insert(row: Row) -> None:
        async with pool.acquire() as c:
            await c.execute(SQL, row[1], row[2], row[3])

    try:
        await pool.execute(TABLE)
        await drive(insert, warm)
        await pool.execute("TRUNCATE bench")
        sample = await drive(insert, rows)
        assert await pool.fetchval("SELECT count(*) FROM bench") == len(rows), "rows missing"
        return sample
    finally:
        await pool.close()


async def tenfold(catalog: str, shards: list[str], rows: list[Row], warm: list[Row]) -> Sample:
    specs = [ShardSpec(name=f"s{i}", url=db_url(name)) for i, name in enumerate(shards)]
    settings = Settings(
        catalog_url=db_url(catalog), shards=specs, pool_min_size=POOL, pool_max_size=POOL
    )
    db = ShardedDatabase(settings)

    async def insert(row: Row) -> None:
        async with db.shard_for(row[0]) as conn:
            await conn.execute(SQL, conn.slot, row[2], row[3])

    try:
        await db.open(ids=False)
        for name in db.shard_names:
            async with db.shard(name) as c:
                await c.execute(TABLE)
        await drive(insert, warm)
        for name in db.shard_names:
            async with db.shard(name) as c:
                await c.execute("TRUNCATE bench")
        sample = await drive(insert, rows)
        counts = await db.scatter("SELECT count(*) AS n FROM bench")
        assert sum(r["n"] for r in counts.rows) == len(rows), "rows missing"
        return sample
    finally:
        await db.close()


async def measure(quick: bool) -> dict[str, Any]:
    try:
        admin = await asyncpg.connect(ADMIN_URL, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        where = redact_url(ADMIN_URL)
        console.print(f"insert_routing: skipped, no PostgreSQL at {where}: {exc}", soft_wrap=True)
        return {"skipped": True, "reason": f"unreachable: {type(exc).__name__}: {exc}"}
    # 9 alternating rounds: single rounds swing by ±10% on a 2-core box.
    n, rounds = (2_000, 3) if quick else (20_000, 9)
    rows, warm = make_rows(n), make_rows(max(n // 10, 500), first_id=10**9)
    prefix = f"tfbench_{uuid.uuid4().hex[:8]}"
    shards = [f"{prefix}_shard{i}" for i in range(4)]
    dbs = [*shards, f"{prefix}_cat1", f"{prefix}_cat4"]
    try:
        server = {k: await admin.fetchval(f"SHOW {k}") for k in ("server_version", "fsync")}
        for name in dbs:
            await admin.execute(f'CREATE DATABASE "{name}"')
            await admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        sides: dict[str, Callable[[], Awaitable[Sample]]] = {
            PEER: lambda: bare(db_url(shards[0]), rows, warm),
            "tenfold 1 shard": lambda: tenfold(f"{prefix}_cat1", shards[:1], rows, warm),
            "tenfold 4 shards": lambda: tenfold(f"{prefix}_cat4", shards, rows, warm),
        }
        samples: dict[str, list[Sample]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name, side in sides.items():
                samples[name].append(await side())
    finally:
        for name in dbs:  # IF EXISTS: those not created yet, after an error
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    rates, cpus = ({name: [s[i] for s in v] for name, v in samples.items()} for i in (0, 1))
    med = {name: median(values) for name, values in rates.items()}
    b, t1, t4 = med.values()
    overhead = (b - t1) / b * 100
    paired = [(x - y) / x * 100 for x, y in zip(*list(rates.values())[:2], strict=True)]
    return {
        "skipped": False,
        "rows": n,
        "rounds": rounds,
        "tasks": TASKS,
        "pool_size": POOL,
        "server": {**server, "synchronous_commit": "off (benchmark databases)"},
        "rows_per_s_median": med,
        "rows_per_s_rounds": rates,
        "client_cpu_us_per_row_median": {name: median(v) for name, v in cpus.items()},
        "client_cpu_us_per_row_rounds": cpus,
        "ratio_tenfold_1_vs_bare": t1 / b,
        "ratio_tenfold_4_vs_bare": t4 / b,
        "overhead_1_shard_percent": overhead,
        "overhead_1_shard_percent_paired_median": median(paired),
        "goal_percent": GOAL_PERCENT,
        "goal_met": overhead <= GOAL_PERCENT,
    }


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(measure(quick))


def render(result: dict[str, Any]) -> Table | None:
    if result["skipped"]:
        return None
    verdict = "[green]met[/]" if result["goal_met"] else "[red]NOT met[/]"
    return sides_table(
        f"Insert routing: {result['rows']:,} rows, {result['tasks']} tasks, "
        f"pool {result['pool_size']}/shard, median of {result['rounds']} rounds",
        f"1-shard routing overhead {result['overhead_1_shard_percent']:.1f}% (paired per "
        f"round: {result['overhead_1_shard_percent_paired_median']:.1f}%); "
        f"goal ≤ {result['goal_percent']:g}%: {verdict}",
        "rows/s",
        result["rows_per_s_rounds"],
        PEER,
        {"client µs/row": result["client_cpu_us_per_row_median"]},
    )


if __name__ == "__main__":
    raise SystemExit(run_main("insert_routing", __doc__ or "", run, render))
