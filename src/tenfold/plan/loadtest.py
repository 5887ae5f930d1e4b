"""Locust's CSV files → per-route figures and time series.

Locust `--csv PREFIX` writes `PREFIX_stats.csv` (one row per request name and
method, plus an "Aggregated" row) and, with `--csv-full-history`,
`PREFIX_stats_history.csv` (one row per second and name: current RPS and
response-time percentiles over Locust's recent window, plus running totals).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AGGREGATED = "Aggregated"
PERCENTILES = ("50%", "95%", "99%")


@dataclass(frozen=True)
class RouteStats:
    method: str
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    max_ms: float


@dataclass
class TimeSeries:
    """Per-second samples of the whole run (the Aggregated rows of the history)."""

    t_s: list[float] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    failures_per_s: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p95_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    requests: int
    failures: int
    rps: float
    duration_s: float
    overall: RouteStats
    routes: list[RouteStats]
    tasks: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(value: str | None) -> float:
    if value is None or value in ("", "N/A"):
        return 0.0
    return float(value)


def read_stats(path: Path) -> list[RouteStats]:
    """The rows of `PREFIX_stats.csv`, the Aggregated row last."""
    rows: list[RouteStats] = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                RouteStats(
                    method=r.get("Type") or "",
                    name=r["Name"],
                    requests=int(_num(r["Request Count"])),
                    failures=int(_num(r["Failure Count"])),
                    rps=_num(r["Requests/s"]),
                    p50_ms=_num(r["50%"]),
                    p95_ms=_num(r["95%"]),
                    p99_ms=_num(r["99%"]),
                    avg_ms=_num(r["Average Response Time"]),
                    max_ms=_num(r["Max Response Time"]),
                )
            )
    rows.sort(key=lambda s: (s.name == AGGREGATED, s.name, s.method))
    return rows


def read_history(path: Path) -> TimeSeries:
    """The Aggregated per-second rows of `PREFIX_stats_history.csv`, time from the first."""
    series = TimeSeries()
    start: float | None = None
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            if r["Name"] != AGGREGATED:
                continue
            t = _num(r["Timestamp"])
            start = t if start is None else start
            series.t_s.append(t - start)
            series.users.append(int(_num(r["User Count"])))
            series.rps.append(_num(r["Requests/s"]))
            series.failures_per_s.append(_num(r["Failures/s"]))
            series.p50_ms.append(_num(r["50%"]))
            series.p95_ms.append(_num(r["95%"]))
            series.p99_ms.append(_num(r["99%"]))
    return series


def summarize(
    rows: Sequence[RouteStats],
    duration_s: float,
    tasks: Mapping[str, Sequence[str]] | None = None,
) -> Summary:
    """Totals, the overall row and the per-route rows; `tasks` groups routes by name prefix.

    A route belongs to the first task with a prefix of its name; the task's
    figures are the sums of its routes' requests, failures and RPS.
    """
    overall = next((r for r in rows if r.name == AGGREGATED), None)
    routes = [r for r in rows if r.name != AGGREGATED]
    if overall is None:
        overall = RouteStats("", AGGREGATED, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    by_task: dict[str, dict[str, float]] = {}
    for kind, prefixes in (tasks or {}).items():
        mine = [r for r in routes if any(r.name.startswith(p) for p in prefixes)]
        by_task[kind] = {
            "requests": sum(r.requests for r in mine),
            "failures": sum(r.failures for r in mine),
            "rps": round(sum(r.rps for r in mine), 2),
        }
    return Summary(
        requests=overall.requests,
        failures=overall.failures,
        rps=overall.rps,
        duration_s=duration_s,
        overall=overall,
        routes=routes,
        tasks=by_task,
    )
