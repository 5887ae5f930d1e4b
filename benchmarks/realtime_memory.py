"""Idle connections: resident memory per idle WebSocket connection, tenfold vs python-socketio.

Measured: the growth of the server process's resident set (VmRSS in
/proc/<pid>/status) when N idle connections (10,000; 500 with `--quick`) are
open, divided by N, in KiB per connection. One worker per side, so the
process measured is the one holding every connection:

- "tenfold hub": `tenfold up arena --workers 1 --server uvicorn` (PostgreSQL
  shard + catalog, events `memory://`); every connection sends `auth` (one of
  N/50 arena users, 50 connections each) and `sub` to the channel of one room
  they all joined, then idles.
- "python-socketio" (reference, `benchmarks/socketio_peer.py`): `tenfold up
  benchmarks.socketio_peer:create_app --workers 1` (in-process manager); every
  connection does the Engine.IO/Socket.IO handshake and joins one room.

The clients are the lean asyncio client of `realtime_fanout` in ONE separate
process, no compression offered (the `websockets` library's per-connection
cost with permessage-deflate is about 64 KiB, mostly zlib state: the goal is
≤ 16 KiB). Offering it would change nothing: `tenfold up` runs uvicorn with
`ws_per_message_deflate=False` (checked: a handshake offering
permessage-deflate gets no extension back), for both sides.

Before the baseline reading, each server gets 50 connections that are opened
and closed (imports, caches and the allocator's arenas warmed by the same code
path), then 2 s to settle. The reading under load is taken once every
connection is set up and has idled for 5 s (shorter than either side's ping
interval: uvicorn 20 s, Engine.IO 25 s). RSS growth counts what a connection
costs the process (protocol objects, buffers, tasks, the hub's subscription and
presence state), not the kernel's socket buffers. One reading per side per
round, sides alternate, fresh servers every round, median of 3 rounds (1 with
`--quick`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from benchmarks._common import console, median
from benchmarks._common import main as run_main
from benchmarks.realtime_fanout import (
    PEER,
    SUBJECT,
    Stats,
    arena_users,
    close_all,
    hub_env,
    open_clients,
    raise_nofile,
)

CONNECTIONS, QUICK_CONNECTIONS = 10_000, 500
GOAL_KIB = 16.0
WARM = 50  # few: closed connections leave memory the measured ones may reuse
ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def hold(args: argparse.Namespace) -> None:
    """Open `n` connections, print "ready", hold them until stdin closes or says a line
    (the first line, the tokens, is read by `hold_main`)."""
    raise_nofile(args.clients + 1000)
    stats = Stats()
    t = time.perf_counter()
    clients = await open_clients(
        stats,
        args.proto,
        args.host,
        args.port,
        args.channel,
        args.token,
        args.clients,
        sample=1 << 30,
    )
    took = time.perf_counter() - t
    sys.stdout.write(json.dumps({"ready": len(clients), "connect_s": took}) + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    close_all(clients)
    await asyncio.sleep(0.5)
    sys.stdout.write(json.dumps({"closed_by_server": stats.close_codes}) + "\n")


def hold_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realtime_memory hold")
    p.add_argument("--proto", choices=("tenfold", "socketio"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--clients", type=int, default=CONNECTIONS)
    args = p.parse_args(argv)
    args.token = sys.stdin.readline().strip()  # the access tokens: not on the command line
    import uvloop

    uvloop.run(hold(args))
    return 0


@contextlib.contextmanager
def holding(proto: str, url: str, channel: str, token: str, n: int):  # type: ignore[no-untyped-def]
    port = url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "benchmarks.realtime_memory", "hold", "--proto", proto]
    cmd += ["--port", port, "--channel", channel, "--clients", str(n)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdin.write(token + "\n")
    proc.stdin.flush()
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"holder ({proto}) failed: {proc.stderr.read()[-1500:]}")  # type: ignore[union-attr]
        yield json.loads(line)
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write("\n")
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def server_pid(app: str, env: dict[str, str], logdir: Path):  # type: ignore[no-untyped-def]
    """`tenfold up APP --workers 1` and its pid (uvicorn serves in that very process)."""
    from benchmarks.gateway_overhead import server

    before = set(_children())
    with server(app, env, workers=1, logdir=logdir) as url:
        fresh = [p for p in _children() if p not in before]
        pid = next(p for p in fresh if app.split(":")[0] in _cmdline(p))
        yield url, pid


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.joinpath("stat").read_text().split(") ", 1)[1].split()[1] == me:
                    out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


def measure(proto: str, url: str, pid: int, channel: str, token: str, n: int) -> dict[str, Any]:
    with holding(proto, url, channel, token, min(WARM, n)):
        pass
    time.sleep(2)
    base = rss_kib(pid)
    with holding(proto, url, channel, token, n) as ready:
        time.sleep(5)
        loaded = rss_kib(pid)
    return {
        "connections": n,
        "rss_before_kib": base,
        "rss_after_kib": loaded,
        "kib_per_connection": (loaded - base) / n,
        "connect_s": ready["connect_s"],
    }


def preflight() -> str | None:
    from benchmarks.realtime_fanout import preflight as fanout_preflight

    return fanout_preflight()


def run(quick: bool) -> dict[str, Any]:
    from benchmarks.gateway_overhead import base_env, databases

    problem = preflight()
    if problem:
        console.print(f"realtime_memory: skipped, {problem}")
        return {"skipped": True, "reason": problem}
    n = QUICK_CONNECTIONS if quick else CONNECTIONS
    rounds = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="tfbench-rtmem-"))
    samples: dict[str, list[dict[str, Any]]] = {PEER: [], SUBJECT: []}
    try:
        with databases(2) as (shard, catalog):
            env = base_env(shard, catalog)
            for i in range(rounds):
                # fresh servers every round: each reading starts from a process that
                # never held the previous round's connections
                with server_pid("benchmarks.socketio_peer:create_app", env, work) as (url, pid):
                    samples[PEER].append(measure("socketio", url, pid, "room-bench", "", n))
                with server_pid("arena", hub_env(env), work) as (url, pid):
                    # one room for every connection, like the peer's one room (join/leave
                    # frames are opt-in and these clients do not ask for them)
                    token, room = arena_users(url, n)
                    samples[SUBJECT].append(measure("tenfold", url, pid, f"room:{room}", token, n))
                for name in samples:
                    s = samples[name][-1]
                    console.print(
                        f"  round {i + 1} {name}: {s['kib_per_connection']:.1f} KiB/connection "
                        f"(RSS {s['rss_before_kib'] / 1024:.0f} → "
                        f"{s['rss_after_kib'] / 1024:.0f} MiB)",
                        highlight=False,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: median([r["kib_per_connection"] for r in runs]) for name, runs in samples.items()}
    return {
        "skipped": False,
        "connections": n,
        "workers": 1,
        "rounds": rounds,
        "kib_per_connection_median": med,
        "rounds_detail": samples,
        "goal_kib": GOAL_KIB,
        "goal_met": med[SUBJECT] <= GOAL_KIB,
    }


def render(result: dict[str, Any]) -> Table | None:
    if result["skipped"]:
        return None
    table = Table(
        title=f"idle connections: {result['connections']:,} on 1 worker, median of "
        f"{result['rounds']} rounds",
        caption=f"goal ≤ {result['goal_kib']:g} KiB per connection (tenfold): "
        f"{'met' if result['goal_met'] else 'NOT met'}",
    )
    for col in ("side", "KiB/connection", "RSS before MiB", "RSS after MiB"):
        table.add_column(col, justify="left" if col == "side" else "right", no_wrap=True)
    for name, runs in result["rounds_detail"].items():
        table.add_row(
            name,
            f"{result['kib_per_connection_median'][name]:.1f}",
            f"{median([r['rss_before_kib'] for r in runs]) / 1024:.0f}",
            f"{median([r['rss_after_kib'] for r in runs]) / 1024:.0f}",
        )
    return table


def goal_lines(result: dict[str, Any]) -> list[str]:
    if result.get("skipped"):
        return [f"idle memory ≤ 16 KiB/connection: not measured ({result['reason']})"]
    med = result["kib_per_connection_median"]
    met = "met" if result["goal_met"] else "NOT met"
    return [
        f"idle memory at {result['connections']:,} connections ≤ {result['goal_kib']:g} KiB each: "
        f"{met} ({med[SUBJECT]:.1f} KiB; python-socketio {med[PEER]:.1f} KiB)"
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["hold"]:
        raise SystemExit(hold_main(sys.argv[2:]))
    raise SystemExit(run_main("realtime_memory", __doc__ or "", run, render))
