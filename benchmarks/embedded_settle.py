"""What crash safety costs the embedded event path: marking outbox rows at settlement.

Issue 13 made `memory://` keep the outbox's guarantee through kill -9: the
relay marks a row published only once every consumer group settled its
event, instead of as soon as it is handed to the in-process stream (which
lost what the stream held when the process died). Same events end to end
workload as `events_e2e` (32 emitters, one topic of 16 partitions, one group,
2 SQLite shards in a temp dir, `MemoryStreams`), two sides in one process,
alternating order per round (3 rounds; 1 with `--quick`):

- "settle (crash-safe)": what tenfold does now.
- "mark on publish (old)": the same code with `MemoryStreams.durable` forced
  to True, which makes the relay mark rows when it publishes them: the
  behaviour before issue 13, and the peer here.

Reported: handled events/s in the closed loop (medians over rounds, ratio to
the old side) and the p99 from commit to handler start at a fixed rate of
half the closed loop's.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

from rich.table import Table

from benchmarks._common import main as run_main
from benchmarks._common import sides_table
from benchmarks.events_e2e import POOL, backend_run
from tenfold.config import Settings
from tenfold.events.memory import MemoryStreams

SIDES = {"settle (crash-safe)": False, "mark on publish (old)": True}
PEER = "mark on publish (old)"


async def _one(durable: bool, seconds: float) -> list[dict[str, Any]]:
    MemoryStreams.durable = durable  # a class attribute: the relay reads it per relay
    try:
        with tempfile.TemporaryDirectory(prefix="tfbench-settle-") as tmp:
            settings = Settings(
                catalog_url=f"sqlite:///{tmp}/catalog.db",
                shard_url=f"sqlite:///{tmp}/shard{{n}}.db",
                shard_count=2,
                events_url="memory://",
                pool_min_size=POOL,
                pool_max_size=POOL,
            )
            return await backend_run(settings, seconds)
    finally:
        MemoryStreams.durable = False


async def measure(quick: bool) -> dict[str, Any]:
    seconds = 2.0 if quick else 8.0
    rounds = 1 if quick else 3
    closed: dict[str, list[float]] = {side: [] for side in SIDES}
    p99: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(rounds):
        order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
        for side in order:
            phases = await _one(SIDES[side], seconds)
            closed[side].append(phases[0]["handled_per_s"])
            p99[side].append(phases[1]["latency_ms"]["p99"])
    return {"seconds_per_phase": seconds, "rounds": rounds, "handled_per_s": closed, "p99_ms": p99}


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(measure(quick))


def render(result: dict[str, Any]) -> Table:
    median_p99 = {s: sorted(v)[len(v) // 2] for s, v in result["p99_ms"].items()}
    return sides_table(
        "Embedded events end to end: crash-safe settle vs mark on publish",
        f"{result['rounds']} alternating rounds of {result['seconds_per_phase']:g} s per phase; "
        "handled/s in the closed loop; p99 ms at half that rate",
        "handled/s",
        result["handled_per_s"],
        PEER,
        {"p99 ms": median_p99},
    )


if __name__ == "__main__":
    raise SystemExit(run_main("embedded_settle", __doc__ or "", run, render))
