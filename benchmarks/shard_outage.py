"""Healthy shards' latency while one of four PostgreSQL shards refuses, or stalls.

    python -m benchmarks.shard_outage [--quick] [--json PATH]

What issue 13 asked for: with one shard down, and with one shard stalled
(locks held by another session for longer than the statement deadline), the
other three shards' requests must still succeed with a bounded p99. Arena runs
in-process (httpx's ASGI transport, default admission control, the testing
password profile) on four throwaway PostgreSQL databases; 32 closed-loop
clients read `GET /wallet` round robin over users on every shard while a
prober polls `/healthz`. Phases: all healthy; s3 refusing connections; s3
stalled (`LOCK TABLE arena_wallets IN ACCESS EXCLUSIVE MODE` held for the
whole phase). Each outage runs twice: with the per-shard guard as configured
(`tenfold` defaults), and with it opened wide (`guard off`: a bulkhead no
request fills and a breaker that never trips), which is what the router did
before the guard.

Needs PostgreSQL at `TENFOLD_BENCH_PG_URL` (default postgres@127.0.0.1:5432).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
from rich.table import Table

from apps.arena.app import create_app
from benchmarks._common import main as run_main
from tenfold.config import Settings, ShardSpec
from tenfold.ids import slot_of_id

ADMIN = os.environ.get("TENFOLD_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PASSWORD = "bench-password-1"
BAD = "s3"
DEADLINE_S = 2.0  # the statement deadline (query_timeout_s)
CLIENTS = 32
RATE_LIMITS = {
    "ip": "6000000/minute burst 1000000 per ip on *",
    "user": "6000000/minute burst 1000000 per user on *",
    "register": "6000000/minute burst 1000000 per ip on POST /auth/register",
}
GUARD_OFF = {"shard_max_concurrent": 100_000, "shard_breaker_failures": 1_000_000_000}


def _url(db: str) -> str:
    return ADMIN.rsplit("/", 1)[0] + f"/{db}"


@asynccontextmanager
async def _databases(names: list[str]) -> AsyncIterator[None]:
    conn = await asyncpg.connect(ADMIN, timeout=5)
    try:
        for name in names:
            await conn.execute(f'CREATE DATABASE "{name}"')
        yield
    finally:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def _settings(prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "catalog_url": _url(f"{prefix}_cat"),
        "shards": [ShardSpec(name=f"s{n}", url=_url(f"{prefix}_{n}")) for n in range(4)],
        "password_profile": "testing",
        "query_timeout_s": DEADLINE_S,
        "connect_timeout_s": 0.5,
        "pool_acquire_timeout_s": 10.0,
        "rate_limits": RATE_LIMITS,
        "log_level": "ERROR",
    }
    values.update(overrides)
    return Settings(**values)


async def _users(settings: Settings) -> dict[str, list[str]]:
    """Register users until every shard holds four wallets; their tokens by shard."""
    app = create_app(settings)
    rt = app.state.tenfold
    await rt.db.open()
    await rt.db.migrate()
    await rt.db.close()
    tokens: dict[str, list[str]] = {f"s{n}": [] for n in range(4)}
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b")
        n = 0
        while any(len(v) < 4 for v in tokens.values()):
            body = {"username": f"bench{n}", "password": PASSWORD}
            n += 1
            reply = await client.post("/auth/register", json=body)
            reply.raise_for_status()
            shard = rt.db.topology.shard_of_slot(slot_of_id(int(reply.json()["id"])))
            if len(tokens[shard]) < 4:
                login = await client.post("/auth/login", json=body)
                login.raise_for_status()
                tokens[shard].append(login.json()["access_token"])
    return tokens


async def _load(app: Any, tokens: dict[str, list[str]], seconds: float) -> dict[str, Any]:
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://b", timeout=60
    )
    shards = sorted(tokens)
    rows: dict[str, list[tuple[int, float]]] = {s: [] for s in shards}
    probes: list[int] = []
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        while time.monotonic() < stop:
            shard = shards[i % 4]
            token = tokens[shard][(i // 4) % len(tokens[shard])]
            i += 1
            started = time.perf_counter()
            reply = await client.get("/wallet", headers={"authorization": f"Bearer {token}"})
            rows[shard].append((reply.status_code, time.perf_counter() - started))

    async def prober() -> None:
        while time.monotonic() < stop:
            probes.append((await client.get("/healthz")).status_code)
            await asyncio.sleep(0.05)

    await asyncio.gather(prober(), *(worker(w) for w in range(CLIENTS)))
    healthy = [r for s in shards if s != BAD for r in rows[s]]
    bad = rows[BAD]
    return {
        "healthy": _figures(healthy, seconds),
        "bad": _figures(bad, seconds),
        "healthz_ok": f"{sum(1 for p in probes if p == 200)}/{len(probes)}",
    }


def _figures(rows: list[tuple[int, float]], seconds: float) -> dict[str, Any]:
    if not rows:
        return {"requests": 0}
    ms = sorted(elapsed * 1000 for _, elapsed in rows)
    ok = sum(1 for status, _ in rows if status == 200)
    return {
        "requests": len(rows),
        "per_s": round(len(rows) / seconds),
        "ok_pct": round(100 * ok / len(rows), 2),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "max_ms": round(ms[-1], 2),
        "statuses": {
            str(s): sum(1 for x, _ in rows if x == s) for s in sorted({x for x, _ in rows})
        },
    }


async def _phase(settings: Settings, tokens: dict[str, list[str]], kind: str, s: float) -> Any:
    if kind == "refusing":
        dead = ShardSpec(name=BAD, url="postgresql://postgres@127.0.0.1:1/gone")
        shards = [x if x.name != BAD else dead for x in settings.shards]
        settings = settings.model_copy(update={"shards": shards})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await _load(app, tokens, 0.5)  # warm the pools
        if kind != "stalled":
            return await _load(app, tokens, s)
        side = await asyncpg.connect(next(x.url for x in settings.shards if x.name == BAD))
        try:
            tx = side.transaction()
            await tx.start()
            await side.execute("LOCK TABLE arena_wallets IN ACCESS EXCLUSIVE MODE")
            result = await _load(app, tokens, s)
            await tx.rollback()
        finally:
            await side.close()
        return result


async def _run(quick: bool) -> dict[str, Any]:
    seconds = 3.0 if quick else 10.0
    prefix = f"tfb_outage_{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}_cat", *(f"{prefix}_{n}" for n in range(4))]
    out: dict[str, Any] = {"clients": CLIENTS, "seconds": seconds, "deadline_s": DEADLINE_S}
    async with _databases(names):
        settings = _settings(prefix)
        tokens = await _users(settings)
        out["healthy"] = await _phase(settings, tokens, "none", seconds)
        for kind in ("refusing", "stalled"):
            out[f"{kind} (tenfold)"] = await _phase(settings, tokens, kind, seconds)
            off = settings.model_copy(update=GUARD_OFF)
            out[f"{kind} (guard off)"] = await _phase(off, tokens, kind, seconds)
    return out


def run(quick: bool) -> dict[str, Any]:
    """All phases; figures per phase for the healthy shards (s0-s2) and the bad one (s3)."""
    return asyncio.run(_run(quick))


def render(result: dict[str, Any]) -> Table:
    table = Table(
        title="GET /wallet over 4 PostgreSQL shards, s3 refusing or stalled",
        caption=f"{result['clients']} clients, {result['seconds']:g} s per phase, "
        f"statement deadline {result['deadline_s']:g} s",
    )
    for column in (
        "phase",
        "healthy req/s",
        "healthy ok %",
        "healthy p50 ms",
        "healthy p99 ms",
        "healthy max ms",
        "s3 p50 ms",
        "s3 p99 ms",
        "s3 statuses",
        "/healthz ok",
    ):
        table.add_column(column, justify="right" if column != "phase" else "left")
    for phase, figures in result.items():
        if not isinstance(figures, dict):
            continue
        h, b = figures["healthy"], figures["bad"]
        table.add_row(
            phase,
            str(h.get("per_s", 0)),
            str(h.get("ok_pct", "-")),
            str(h.get("p50_ms", "-")),
            str(h.get("p99_ms", "-")),
            str(h.get("max_ms", "-")),
            str(b.get("p50_ms", "-")),
            str(b.get("p99_ms", "-")),
            " ".join(f"{k}:{v}" for k, v in b.get("statuses", {}).items()),
            figures["healthz_ok"],
        )
    return table


if __name__ == "__main__":
    raise SystemExit(run_main("shard_outage", __doc__ or "", run, render))
