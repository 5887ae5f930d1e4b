"""Load-test analysis: read Locust's CSV output, summarise it, plot it, report it.

`loadtest` turns Locust's `--csv` files into a summary (requests, failures,
RPS, p50/p95/p99 per route and overall) and time series; `report` draws the
time series with matplotlib and writes a self-contained HTML page.
"""

from tenfold.plan.loadtest import (
    RouteStats,
    Summary,
    TimeSeries,
    read_history,
    read_stats,
    summarize,
)

__all__ = ["RouteStats", "Summary", "TimeSeries", "read_history", "read_stats", "summarize"]
