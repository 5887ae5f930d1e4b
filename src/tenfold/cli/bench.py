"""`tenfold bench`: run arena's Locust load headless against a running app and report it.

Locust runs as a subprocess (`python -m locust -f apps/arena/locustfile.py
--headless --csv ... --csv-full-history`), so gevent's monkey-patching never
meets this process's asyncio. Afterwards `OUT/summary.json` holds total
requests, failures, RPS and p50/p95/p99 per route and overall, and
`OUT/report.html` the same with plots of throughput and latency over time.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tenfold.cli.output import console, emit_json, fail


def _arena_locustfile() -> Path:
    spec = importlib.util.find_spec("apps.arena")
    where = list(spec.submodule_search_locations or []) if spec else []
    return Path(where[0] if where else "apps/arena") / "locustfile.py"


LOCUSTFILE = _arena_locustfile()
# arena's task kinds, as route-name prefixes (see apps/arena/locustfile.py)
TASKS = {
    "login": ("/auth/login",),
    "chat": ("/rooms/{id}/messages",),
    "wallet": ("/wallet",),
}
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


def parse_duration(text: str) -> int:
    """Seconds in '30s', '2m', '1m30s', '1h' or a bare number of seconds."""
    m = _DURATION.match(text.strip())
    if not text.strip() or m is None or not any(m.groups()):
        raise ValueError(f"--time must look like 30s, 2m or 1m30s, got {text!r}")
    h, mi, s = (int(g or 0) for g in m.groups())
    seconds = h * 3600 + mi * 60 + s
    if seconds < 1:
        raise ValueError(f"--time must be at least 1s, got {text!r}")
    return seconds


def locust_command(
    locustfile: Path, host: str, users: int, spawn_rate: float, seconds: int, prefix: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        str(spawn_rate),
        "--run-time",
        f"{seconds}s",
        "--stop-timeout",
        "5",
        "--csv",
        str(prefix),
        "--csv-full-history",
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]


def check_host(host: str) -> None:
    try:
        httpx.get(f"{host.rstrip('/')}/healthz", timeout=3.0)
    except httpx.HTTPError as exc:
        raise fail(
            f"no app answers at {host} ({type(exc).__name__}); start one with `tenfold up`"
        ) from None


def run_locust(command: list[str], seconds: int, log: Path, quiet: bool) -> int:
    """Run Locust to completion with a progress bar over the run time; its exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            with Progress(
                TextColumn("[bold]load test"),
                BarColumn(),
                TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                TimeRemainingColumn(),
                console=console,
                disable=quiet,
                transient=True,
            ) as progress:
                bar = progress.add_task("run", total=seconds)
                start = time.monotonic()
                while proc.poll() is None:
                    progress.update(bar, completed=min(seconds, time.monotonic() - start))
                    time.sleep(0.2)
            return proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait(10)
            raise


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(
        title=f"tenfold bench: {summary['requests']:,} requests, {summary['failures']:,} "
        f"failures, {summary['rps']:,.1f} RPS",
        caption=f"report: {summary['report']}",
    )
    for col in ("method", "route", "requests", "failures", "RPS", "p50 ms", "p95 ms", "p99 ms"):
        left = col in ("method", "route")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for r in [*summary["routes"], summary["overall"]]:
        table.add_row(
            r["method"],
            r["name"],
            f"{r['requests']:,}",
            f"{r['failures']:,}",
            f"{r['rps']:,.1f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p95_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
        )
    return table


def bench(
    host: str = typer.Option("http://127.0.0.1:8000", help="The running app (`tenfold up`)."),
    users: int = typer.Option(20, min=1, help="Simulated users."),
    spawn_rate: float = typer.Option(10.0, min=0.1, help="Users started per second."),
    run_time: str = typer.Option("30s", "--time", help="How long: 30s, 2m, 1m30s."),
    out: Path = typer.Option(Path("bench-out"), help="Folder for CSVs, summary.json, report."),
    wait: float = typer.Option(
        1.0, min=0.0, help="Each user waits 0..WAIT s between tasks (0: as fast as possible)."
    ),
    locustfile: Path = typer.Option(LOCUSTFILE, help="The Locust file (arena's by default)."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json instead of a table."),
) -> None:
    """Load-test a running app with Locust (login 30%, chat 50%, wallet 20%) and report."""
    try:
        seconds = parse_duration(run_time)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if importlib.util.find_spec("locust") is None:
        raise fail("locust is not installed; pip install 'tenfold[bench]'")
    if not locustfile.is_file():
        raise fail(f"no Locust file at {locustfile}")
    check_host(host)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    command = locust_command(locustfile, host, users, spawn_rate, seconds, prefix)
    os.environ["TENFOLD_BENCH_WAIT"] = f"{wait:g}"
    code = run_locust(command, seconds, out / "locust.log", quiet=as_json)
    stats, history = Path(f"{prefix}_stats.csv"), Path(f"{prefix}_stats_history.csv")
    if not stats.exists():
        tail = (out / "locust.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise fail(f"locust exited {code} without results: {' '.join(tail) or 'no output'}")

    from tenfold.plan.loadtest import read_history, read_stats, summarize
    from tenfold.plan.report import write_html

    summary = summarize(read_stats(stats), float(seconds), TASKS)
    series = read_history(history)
    report = write_html(out / "report.html", f"tenfold bench: {host}", summary, series)
    data = {
        "host": host,
        "users": users,
        "spawn_rate": spawn_rate,
        "wait_s": wait,
        "locust_exit_code": code,
        **summary.to_dict(),
        "report": str(report),
    }
    (out / "summary.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    if as_json:
        emit_json(data)
    else:
        console.print(summary_table(data))
