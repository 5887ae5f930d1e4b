"""A load test's HTML report: the summary table and two plots, PNGs embedded as base64."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from tenfold.plan.loadtest import Summary, TimeSeries


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode()


def plots(series: TimeSeries) -> dict[str, str]:
    """Base64 PNGs: throughput (RPS, failures/s, users) and latency percentiles over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(series.t_s, series.rps, label="requests/s")
    ax.plot(series.t_s, series.failures_per_s, label="failures/s", color="tab:red")
    ax.set_xlabel("seconds")
    ax.set_ylabel("per second")
    users = ax.twinx()
    users.plot(series.t_s, series.users, label="users", color="tab:gray", linestyle=":")
    users.set_ylabel("users")
    ax.legend(loc="upper left")
    ax.set_title("Throughput")
    out["throughput"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name, values in (("p50", series.p50_ms), ("p95", series.p95_ms), ("p99", series.p99_ms)):
        ax.plot(series.t_s, values, label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("ms")
    ax.legend(loc="upper left")
    ax.set_title("Response time percentiles (Locust's recent window)")
    out["latency"] = _png(fig)
    plt.close(fig)
    return out


def write_html(path: Path, title: str, summary: Summary, series: TimeSeries) -> Path:
    """Write the report to `path`: the figures per route, then the plots."""
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(c))}</td>"
            for c in (
                r.method,
                r.name,
                r.requests,
                r.failures,
                f"{r.rps:.1f}",
                f"{r.p50_ms:.0f}",
                f"{r.p95_ms:.0f}",
                f"{r.p99_ms:.0f}",
            )
        )
        + "</tr>"
        for r in [*summary.routes, summary.overall]
    )
    images = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{data}">'
        for name, data in plots(series).items()
    )
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;"
        "text-align:right}td:nth-child(2),th:nth-child(2){text-align:left}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        f"<p>{summary.requests:,} requests, {summary.failures:,} failures, "
        f"{summary.rps:,.1f} requests/s over {summary.duration_s:.0f} s</p>"
        "<table><tr><th>method</th><th>route</th><th>requests</th><th>failures</th>"
        "<th>RPS</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th></tr>"
        f"{rows}</table>{images}</body></html>"
    )
    return path
