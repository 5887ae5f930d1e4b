"""Shared helpers: command line, medians, the run's environment, JSON output."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
console = Console()


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    return parser.parse_args(argv)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def environment(quick: bool, extra: Sequence[str] = ()) -> dict[str, Any]:
    """What the figures depend on besides the code: versions (plus `extra` dists), CPUs, load."""
    versions = {}
    for dist in ("tenfold", "asyncpg", "uhashring", "xxhash", *extra):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {
        "quick": quick,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "unix_time": round(time.time()),
        "versions": versions,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` through a `.tmp` file, so a crash leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def rate(n: float) -> str:
    """A throughput with a thousands separator and no decimals."""
    return f"{n:,.0f}"


def sides_table(
    title: str,
    caption: str,
    unit: str,
    rounds: dict[str, list[float]],
    peer: str,
    extra: dict[str, dict[str, float]] | None = None,
) -> Table:
    """One row per side: median, min..max over the rounds, ratio to `peer`, extra columns."""
    table = Table(title=title, caption=f"{caption}\nratio = side / {peer} (medians)")
    table.add_column("side", no_wrap=True)
    for column in (unit, "min..max", "ratio", *(extra or {})):
        table.add_column(column, justify="right", no_wrap=True)
    base = median(rounds[peer])
    for name, values in rounds.items():
        value = median(values)
        cells = [rate(value), f"{rate(min(values))}..{rate(max(values))}", f"{value / base:.3f}x"]
        table.add_row(name, *cells, *(f"{col[name]:.1f}" for col in (extra or {}).values()))
    return table


def main(
    name: str,
    doc: str,
    run: Callable[[bool], dict[str, Any]],
    render: Callable[[dict[str, Any]], Table | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Run one benchmark as a program: print its table, optionally write its JSON."""
    args = parse_args(doc, argv)
    result = run(args.quick)
    table = render(result)
    if table is not None:
        console.print(table)
    if args.json:
        write_json(args.json, {"environment": environment(args.quick), name: result})
        console.print(f"figures written to {args.json}")
    return 0


def redis_url() -> str:
    """The Redis benchmarks use: `TENFOLD_BENCH_REDIS_URL` or the local default."""
    return os.environ.get("TENFOLD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


async def calls_per_s(
    call: Callable[[str], Awaitable[Any]], items: list[str], concurrency: int
) -> float:
    """`call(item)` for every item from `concurrency` tasks; completed calls per second."""
    gc.collect()
    chunks = [items[i::concurrency] for i in range(concurrency)]

    async def worker(chunk: list[str]) -> None:
        for item in chunk:
            await call(item)

    start = time.perf_counter()
    await asyncio.gather(*(worker(chunk) for chunk in chunks))
    return len(items) / (time.perf_counter() - start)


async def delete_redis_keys(url: str, patterns: Sequence[str]) -> None:
    """Delete every key matching each SCAN pattern (a benchmark's run-unique prefixes)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=10)
    try:
        for pattern in patterns:
            batch = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await client.delete(*batch)
                    batch.clear()
            if batch:
                await client.delete(*batch)
    finally:
        await client.aclose()
