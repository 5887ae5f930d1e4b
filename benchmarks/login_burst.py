"""40 concurrent logins against `tenfold up arena` with the production password profile.

    python -m benchmarks.login_burst [--quick] [--json PATH]

What issue 13 measured: 40 logins at once, argon2id with OWASP's parameters
(19 MiB, t=2: CPU-bound, tens of ms each), answered 34 x 503 by admission
control. This starts arena (uvicorn, 1 worker, embedded SQLite shards, the
default settings but the rate limits, which would otherwise refuse a burst
from one address), registers N users one by one, then sends their N correct
logins at once and reports the status counts and the latency spread. No
peer: the figure is what a burst of logins gets on this box.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from benchmarks._common import main as run_main
from benchmarks.gateway_overhead import server

PASSWORD = "bench-password-1"
RATE_LIMITS = json.dumps(
    {
        "ip": "600000/minute burst 100000 per ip on *",
        "user": "600000/minute burst 100000 per user on *",
        "register": "600000/minute burst 100000 per ip on POST /auth/register",
        "login_ip": "600000/minute burst 100000 per ip",
    }
)


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    env.update(
        {
            "TENFOLD_SHARD_URL": f"sqlite:///{work}/shard{{n}}.db",
            "TENFOLD_CATALOG_URL": f"sqlite:///{work}/catalog.db",
            "TENFOLD_EVENTS_URL": "memory://",
            "TENFOLD_LOG_LEVEL": "WARNING",
            "TENFOLD_RATE_LIMITS": RATE_LIMITS,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
    )
    return env


async def _burst(url: str, users: int) -> dict[str, Any]:
    names = [f"burst{os.getpid()}n{i}" for i in range(users)]
    limits = httpx.Limits(max_connections=users + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for name in names:  # one by one: registering is not what is measured
            r = await client.post("/auth/register", json={"username": name, "password": PASSWORD})
            r.raise_for_status()

        async def login(name: str) -> tuple[int, float]:
            started = time.perf_counter()
            r = await client.post("/auth/login", json={"username": name, "password": PASSWORD})
            return r.status_code, time.perf_counter() - started

        started = time.perf_counter()
        results = await asyncio.gather(*(login(n) for n in names))
        wall = time.perf_counter() - started
    statuses = collections.Counter(status for status, _ in results)
    ok = sorted(s for status, s in results if status == 200)
    return {
        "logins": users,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": round(wall, 3),
        "ok_latency_s": {
            "min": round(ok[0], 3) if ok else None,
            "median": round(ok[len(ok) // 2], 3) if ok else None,
            "max": round(ok[-1], 3) if ok else None,
        },
    }


def run(quick: bool) -> dict[str, Any]:
    users = 10 if quick else 40
    work = Path(tempfile.mkdtemp(prefix="tfbench-login-"))
    try:
        with server("arena", _env(work), logdir=work) as url:
            result = asyncio.run(_burst(url, users))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["password_profile"] = "default (argon2id OWASP: 19 MiB, t=2, p=1)"
    result["server"] = "tenfold up arena, uvicorn, 1 worker, SQLite shards, memory:// events"
    result["cpus"] = os.cpu_count()
    return result


def render(result: dict[str, Any]) -> Table:
    table = Table(title=f"{result['logins']} concurrent logins ({result['password_profile']})")
    for col in ("statuses", "wall s", "ok min s", "ok median s", "ok max s"):
        table.add_column(col)
    lat = result["ok_latency_s"]
    table.add_row(
        ", ".join(f"{k}: {v}" for k, v in result["statuses"].items()),
        str(result["wall_s"]),
        str(lat["min"]),
        str(lat["median"]),
        str(lat["max"]),
    )
    return table


if __name__ == "__main__":
    raise SystemExit(run_main("login_burst", __doc__ or "", run, render))
