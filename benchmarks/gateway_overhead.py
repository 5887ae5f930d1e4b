"""Middleware overhead: arena's send-message endpoint on the full tenfold stack vs bare FastAPI.

Measured: successful (2xx) requests/s and p99 latency of `POST /rooms/{id}/messages` (no
Idempotency-Key), driven by `wrk` (1 thread, 16 keep-alive connections, a Lua
script for the JSON body and the Bearer token) for 8 s per round (3 s with
`--quick`). Sides, each its own `tenfold up ... --server uvicorn` process (1
worker, httptools, uvloop, no access log), all on one PostgreSQL shard
database (`TENFOLD_SHARD_COUNT=1`, events `memory://`, pool 10 connections):

- "bare FastAPI + asyncpg" (the peer, `benchmarks/bare_messages.py`): body
  validation, then one `INSERT INTO arena_messages` with the same columns,
  from an asyncpg pool of 10.
- "arena, full stack": tenfold's gateway middleware (request id, JWT auth,
  per-IP/per-user rate limits, adaptive admission, metrics, tracing hooks),
  then arena's handler: the room-membership check through the tiered cache
  (an L1 hit after the first request), then one transaction on the room's
  shard: the message row plus an outbox row, and the in-process relay that
  publishes the outbox and the realtime consumer behind it. This is more work
  than the peer's single insert, on purpose: it is the issue's comparison
  (goal: the stack costs ≤ 30%, i.e. arena ≥ 0.70x the bare RPS).
- "bare ... + outbox row in one transaction" (`create_app_outbox`): the peer
  doing what a hand-rolled transactional outbox costs (BEGIN, the message row,
  an outbox row, COMMIT), with no relay: arena against it is tenfold's own cost.
- "arena, auth only": the same app with tenfold's middleware replaced by a
  minimal one that only verifies the JWT (the handler needs the principal):
  full minus this side is the cost of the middleware, this side minus bare is
  the app's own work (membership, transaction, outbox, relay). It runs on its
  own two databases: on arena's, arena's relay (holding the outbox lease)
  would publish this side's events on arena's CPU, not this side's.

Why it is fair: same server, worker count, loop, HTTP parser, database,
table, pool size, request body and client; the servers run side by side and
rounds alternate (bare, full, auth only) so drift and the other engineers'
load hit all sides alike; medians of 5 rounds (2 with `--quick`) are
reported. The benchmark database gets `synchronous_commit = off`, as in
`insert_routing`: the WAL flush wait is the same for both sides and would
otherwise dominate the noise. Rate limits are raised so that no side gets 429;
answers that are not 2xx (the admission controller's 503s when its queue wait
passes 50 ms) are counted and left out of the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from benchmarks._common import console, median, rate
from benchmarks._common import main as run_main
from benchmarks._nats import ADMIN_URL, db_url
from tenfold.observe.services import create_databases, drop_databases, free_port

ROOT = Path(__file__).resolve().parent.parent
PEER, FULL, AUTH_ONLY = "bare FastAPI + asyncpg", "arena, full stack", "arena, auth only"
PEER_TX = "bare FastAPI + asyncpg, message + outbox row in one transaction"
CONNECTIONS, GOAL_RATIO = 16, 0.70
RATE_LIMITS = json.dumps(
    {
        "ip": "60000000/minute burst 1000000 per ip on *",
        "user": "60000000/minute burst 1000000 per user on *",
        "login_account": "60000000/minute burst 1000000 per account",
        "login_ip": "60000000/minute burst 1000000 per ip",
        "register": "60000000/minute burst 1000000 per ip on POST /auth/register",
    }
)
LUA = """
wrk.method = "POST"
wrk.body = '{"body":"hello from the benchmark, a message of ordinary length"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def base_env(shard_url: str, catalog_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    env.update(
        {
            "TENFOLD_SHARD_URL": shard_url,
            "TENFOLD_SHARD_COUNT": "1",
            "TENFOLD_CATALOG_URL": catalog_url,
            "TENFOLD_EVENTS_URL": "memory://",
            "TENFOLD_LOG_LEVEL": "WARNING",
            "TENFOLD_PASSWORD_PROFILE": "testing",
            "TENFOLD_RATE_LIMITS": RATE_LIMITS,
            "TENFOLD_POOL_MIN_SIZE": "10",
            "TENFOLD_POOL_MAX_SIZE": "10",
            "PYTHONPATH": str(ROOT),  # the servers run in a temporary folder
            **extra,
        }
    )
    return env


@contextlib.contextmanager
def server(
    app: str, env: dict[str, str], *, server: str = "uvicorn", workers: int = 1, logdir: Path
) -> Iterator[str]:
    """`tenfold up APP` on a free port until the block ends; yields its base URL."""
    port = free_port()
    log = (logdir / f"{app.replace(':', '_')}-{server}-{port}.log").open("wb")
    cmd = [sys.executable, "-m", "tenfold.cli.main", "up", app, "--port", str(port)]
    cmd += ["--server", server, "--workers", str(workers)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=logdir)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{app} exited: {Path(log.name).read_text()[-800:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{app} did not answer within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def arena_room(url: str) -> tuple[str, str]:
    """Register a user, log in, create a room: (access token, room id)."""
    name = f"bench{os.getpid()}{int(time.time() * 1000) % 10**8}"
    creds = {"username": name, "password": "bench-password-1"}
    with httpx.Client(base_url=url, timeout=10) as c:
        c.post("/auth/register", json=creds).raise_for_status()
        token = c.post("/auth/login", json=creds).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        room = c.post("/rooms", json={"name": "bench"}, headers=auth).json()["id"]
    return token, room


def wrk(url: str, script: Path, seconds: float, connections: int = CONNECTIONS) -> dict[str, float]:
    """One wrk run: 2xx answers/s, p50/p99 ms (all answers), and answers that were not 2xx."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    all_rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    non_2xx = float(bad.group(1)) if bad else 0.0
    return {
        "rps": all_rps * (total - non_2xx) / total if total else 0.0,  # 2xx answers only
        "rps_all_answers": all_rps,
        "p50_ms": _ms(re.search(r"50%\s+([\d.]+)(us|ms|s)", out)),
        "p99_ms": _ms(re.search(r"99%\s+([\d.]+)(us|ms|s)", out)),
        "non_2xx": non_2xx,
        "socket_errors": 1.0 if errors else 0.0,
    }


def _ms(m: re.Match[str] | None) -> float:
    if m is None:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def lua(workdir: Path, name: str, token: str) -> Path:
    path = workdir / f"{name}.lua"
    path.write_text(LUA % token)
    return path


def alternate(
    targets: dict[str, tuple[str, Path]], rounds: int, seconds: float, warm_s: float
) -> dict[str, list[dict[str, float]]]:
    """Warm every side once, then `rounds` rounds of one wrk run per side, in order."""
    for url, script in targets.values():
        wrk(url, script, warm_s)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for i in range(rounds):
        for name, (url, script) in targets.items():
            samples[name].append(wrk(url, script, seconds))
            s = samples[name][-1]
            console.print(
                f"  round {i + 1} {name}: {rate(s['rps'])} req/s, p99 {s['p99_ms']:.1f} ms"
                + (f", {s['non_2xx']:.0f} non-2xx" if s["non_2xx"] else ""),
                highlight=False,
            )
    return samples


def summarize(samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    return {
        name: {
            "rps_median": median([s["rps"] for s in runs]),
            "p99_ms_median": median([s["p99_ms"] for s in runs]),
            "p50_ms_median": median([s["p50_ms"] for s in runs]),
            "non_2xx_total": sum(s["non_2xx"] for s in runs),
            "rounds": runs,
        }
        for name, runs in samples.items()
    }


@contextlib.contextmanager
def databases(n: int) -> Iterator[list[str]]:
    """`n` throwaway databases (URLs) with synchronous_commit off, always dropped."""
    prefix = f"tfbench_{os.getpid()}_{int(time.time()) % 100000}"
    names = [f"{prefix}_{i}" for i in range(n)]
    asyncio.run(create_databases(ADMIN_URL, names, options={"synchronous_commit": "off"}))
    try:
        yield [db_url(name) for name in names]
    finally:
        asyncio.run(drop_databases(ADMIN_URL, names))


def app_settings(settings: Any) -> Any:
    """`tenfold up`'s settings hook for `arena_auth_only`: arena's (its migrations and rules)."""
    from apps.arena.app import arena_settings

    return arena_settings(settings)


def arena_auth_only() -> Any:
    """arena with tenfold's middleware replaced by one that only authenticates (JWT)."""
    from apps.arena.app import create_app
    from tenfold.gateway.middleware import TenfoldMiddleware

    app = create_app()
    runtime = app.state.tenfold
    app.user_middleware = [m for m in app.user_middleware if m.cls is not TenfoldMiddleware]

    def auth_only(inner: Any) -> Any:
        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                principal = runtime.authenticate(scope)
                if principal is not None:
                    scope["tenfold.principal"] = principal
            await inner(scope, receive, send)

        return asgi

    app.add_middleware(auth_only)  # type: ignore[arg-type]
    return app


def preflight() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if shutil.which("wrk") is None:
        return "wrk is not installed (apt-get install wrk)"
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            pass
    except OSError as exc:
        return f"no PostgreSQL at {ADMIN_URL}: {exc}"
    return None


def run(quick: bool) -> dict[str, Any]:
    problem = preflight()
    if problem:
        console.print(f"gateway_overhead: skipped, {problem}")
        return {"skipped": True, "reason": problem}
    rounds, seconds, warm = (2, 3.0, 2.0) if quick else (5, 8.0, 3.0)
    work = Path(tempfile.mkdtemp(prefix="tfbench-gw-"))
    load = os.getloadavg()[0]
    try:
        with databases(4) as (shard, catalog, own_shard, own_catalog):
            env = base_env(shard, catalog)
            with (
                server("arena", env, logdir=work) as full,
                # Its own databases: on arena's, arena's relay (holding the lease)
                # would publish this side's events, off this side's CPU bill.
                server(
                    "benchmarks.gateway_overhead:arena_auth_only",
                    base_env(own_shard, own_catalog),
                    logdir=work,
                ) as auth,
                server("benchmarks.bare_messages:create_app", env, logdir=work) as bare,
                server("benchmarks.bare_messages:create_app_outbox", env, logdir=work) as bare_tx,
            ):
                token, room = arena_room(full)
                auth_token, auth_room = arena_room(auth)
                script = lua(work, "send", token)
                path = f"/rooms/{room}/messages"
                samples = alternate(
                    {
                        PEER: (bare + path, script),
                        PEER_TX: (bare_tx + path, script),
                        FULL: (full + path, script),
                        AUTH_ONLY: (
                            f"{auth}/rooms/{auth_room}/messages",
                            lua(work, "send-auth-only", auth_token),
                        ),
                    },
                    rounds,
                    seconds,
                    warm,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sides = summarize(samples)
    bare_rps, full_rps = sides[PEER]["rps_median"], sides[FULL]["rps_median"]
    auth_rps = sides[AUTH_ONLY]["rps_median"]
    paired = [f["rps"] / b["rps"] for f, b in zip(samples[FULL], samples[PEER], strict=True)]
    return {
        "skipped": False,
        "endpoint": "POST /rooms/{id}/messages (no Idempotency-Key)",
        "load_generator": f"wrk -t1 -c{CONNECTIONS}, {seconds:g} s per round",
        "server": "uvicorn, 1 worker, httptools, uvloop",
        "rounds": rounds,
        "loadavg_1m_at_start": load,
        "sides": sides,
        "ratio_full_vs_bare": full_rps / bare_rps,
        "ratio_full_vs_bare_paired_median": median(paired),
        "ratio_auth_only_vs_bare": auth_rps / bare_rps,
        "ratio_full_vs_bare_outbox": full_rps / sides[PEER_TX]["rps_median"],
        "ratio_full_vs_auth_only": full_rps / auth_rps,
        "stack_cost_percent": (1 - full_rps / bare_rps) * 100,
        "middleware_cost_percent": (1 - full_rps / auth_rps) * 100,
        "goal_ratio": GOAL_RATIO,
        "goal_met": full_rps / bare_rps >= GOAL_RATIO,
    }


def render(result: dict[str, Any]) -> Table | None:
    if result["skipped"]:
        return None
    table = Table(
        title=f"send-message: {result['server']}; {result['load_generator']}; "
        f"median of {result['rounds']} rounds",
        caption=f"stack cost {result['stack_cost_percent']:.1f}% (goal ≤ 30%: "
        f"{'met' if result['goal_met'] else 'NOT met'}); middleware alone "
        f"{result['middleware_cost_percent']:.1f}%; arena vs a bare hand-rolled outbox "
        f"{result['ratio_full_vs_bare_outbox']:.2f}x; ratio = side / {PEER}",
    )
    for col in ("side", "req/s", "min..max", "p99 ms", "ratio"):
        table.add_column(col, justify="left" if col == "side" else "right", no_wrap=True)
    base = result["sides"][PEER]["rps_median"]
    for name, s in result["sides"].items():
        values = [r["rps"] for r in s["rounds"]]
        table.add_row(
            name,
            rate(s["rps_median"]),
            f"{rate(min(values))}..{rate(max(values))}",
            f"{s['p99_ms_median']:.1f}",
            f"{s['rps_median'] / base:.3f}x",
        )
    return table


if __name__ == "__main__":
    raise SystemExit(run_main("gateway_overhead", __doc__ or "", run, render))
