"""End-to-end events: emit in a shard transaction → relay → stream → consumer handler.

Measured, per backend: events/s handled and the latency from the emitting
transaction's commit to the start of the handler (p50/p95/p99, ms). Each event
carries a sequence number; the emitter notes `perf_counter()` right after its
commit, the handler right on entry (same process, same clock). Two phases, T =
10 s each (2 s with `--quick`):

- closed loop: 32 emitters, each `async with db.shard_for(key) as conn,
  conn.transaction(): await bus.emit(conn, topic, key, payload)` as fast as it
  can; handled/s = events / (last handler start - first emit), so a backlog left
  at the end counts against it. Latency here includes queueing.
- fixed rate: the same emitters offer half the closed loop's handled rate on a
  fixed schedule, for latency without saturation.

Backends: `nats` (2 Postgres shards on throwaway databases, default
`synchronous_commit`, `NatsStreams` on the pinned nats-server with
`sync_interval: always`) and `memory` (the embedded mode: 2 SQLite shards in a
temp dir, `MemoryStreams`). One topic, 16 partitions, one consumer group whose
handler only records the time; ~200-byte JSON payloads. Issue 3 names no peer
for this path, so the figures are reported without a ratio. The bus runs with
its defaults (relay batch 256, poll 0.2 s; Postgres wakes the relay by NOTIFY,
SQLite has no NOTIFY so the relay polls).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from rich.table import Table

from benchmarks._common import main as run_main
from benchmarks._common import rate
from benchmarks._nats import nats_server, pg_databases
from tenfold.config import Settings, ShardSpec
from tenfold.data.router import ShardedDatabase
from tenfold.events import Delivery, EventBus
from tenfold.events.nats import NatsStreams, dlq_stream_name, stream_name

TOPIC, EMITTERS, POOL = "bench.e2e", 32, 16
FILLER = "lorem ipsum " * 13


class Recorder:
    """Commit and handler times by event sequence number."""

    def __init__(self) -> None:
        self.committed: dict[int, float] = {}
        self.handled: dict[int, float] = {}
        self.seq = itertools.count()
        self.all_handled = asyncio.Event()
        self.phase = 0

    def next_phase(self) -> None:
        self.phase += 1
        self.committed.clear()
        self.handled.clear()

    async def handle(self, delivery: Delivery) -> None:
        now = time.perf_counter()
        data = delivery.event.data()
        if data["phase"] != self.phase:
            return  # a late redelivery from an earlier phase
        self.handled.setdefault(data["seq"], now)  # a redelivery keeps the first time
        if len(self.handled) == len(self.committed):
            self.all_handled.set()

    async def emit(self, bus: EventBus, db: ShardedDatabase) -> None:
        seq = next(self.seq)
        key = f"user:{seq}"
        async with db.shard_for(key) as conn, conn.transaction():
            payload = {"phase": self.phase, "seq": seq, "text": FILLER}
            await bus.emit(conn, TOPIC, key, payload)
        self.committed[seq] = time.perf_counter()
        self.all_handled.clear()


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


Bench = tuple[EventBus, ShardedDatabase, Recorder]


async def phase(bench: Bench, seconds: float, offered: float | None) -> dict[str, Any]:
    """Emit for `seconds` (as fast as possible, or `offered` events/s), then wait for handlers."""
    bus, db, rec = bench
    rec.next_phase()
    start = time.perf_counter()
    end = start + seconds
    ticket = itertools.count()

    async def emitter() -> None:
        while True:
            if offered is not None:
                due = start + next(ticket) / offered
                if due >= end:
                    return
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            elif time.perf_counter() >= end:
                return
            await rec.emit(bus, db)

    await asyncio.gather(*(emitter() for _ in range(EMITTERS)))
    emitted_s = time.perf_counter() - start
    async with asyncio.timeout(120):
        while len(rec.handled) < len(rec.committed):
            await rec.all_handled.wait()
    n = len(rec.committed)
    latencies = sorted((rec.handled[s] - rec.committed[s]) * 1e3 for s in rec.committed)
    return {
        "mode": "closed loop" if offered is None else "fixed rate",
        "offered_per_s": offered,
        "events": n,
        "emitted_per_s": n / emitted_s,
        "handled_per_s": n / (max(rec.handled.values()) - start),
        "latency_ms": {f"p{p}": percentile(latencies, p) for p in (50, 95, 99)},
        "latency_ms_max": latencies[-1],
    }


@contextlib.asynccontextmanager
async def open_bus(settings: Settings) -> AsyncIterator[Bench]:
    db = ShardedDatabase(settings)
    try:
        await db.open(ids=False)
        await db.migrate()
        bus = EventBus(db)
        bus.topic(TOPIC, partitions=16)
        rec = Recorder()
        bus.consumer(TOPIC, group="bench")(rec.handle)
        await bus.start()
        try:
            yield bus, db, rec
        finally:
            await bus.stop()
    finally:
        await db.close()


async def backend_run(settings: Settings, seconds: float) -> list[dict[str, Any]]:
    async with open_bus(settings) as bench:
        await phase(bench, min(1.0, seconds / 2), 200.0)  # warm-up: connections, consumers
        closed = await phase(bench, seconds, None)
        fixed = await phase(bench, seconds, closed["handled_per_s"] / 2)
    return [closed, fixed]


async def drop_streams(url: str) -> None:
    admin = NatsStreams(url)
    await admin.start()
    try:
        for name in (stream_name(TOPIC), dlq_stream_name(TOPIC)):
            with contextlib.suppress(Exception):
                await admin._jetstream().delete_stream(name)
    finally:
        await admin.close()


async def measure(quick: bool) -> dict[str, Any]:
    seconds = 2.0 if quick else 10.0
    rows: dict[str, list[dict[str, Any]]] = {}
    pool = {"pool_min_size": POOL, "pool_max_size": POOL}
    async with pg_databases(3) as (catalog, *shards):
        with nats_server() as server:
            specs = [ShardSpec(name=f"s{i}", url=url) for i, url in enumerate(shards)]
            settings = Settings(catalog_url=catalog, shards=specs, events_url=server.url, **pool)
            try:
                rows["nats"] = await backend_run(settings, seconds)
            finally:
                await drop_streams(server.url)
    with tempfile.TemporaryDirectory(prefix="tfbench-e2e-") as tmp:
        settings = Settings(
            catalog_url=f"sqlite:///{tmp}/catalog.db",
            shard_url=f"sqlite:///{tmp}/shard{{n}}.db",
            shard_count=2,
            events_url="memory://",
            **pool,
        )
        rows["memory"] = await backend_run(settings, seconds)
    return {
        "seconds_per_phase": seconds,
        "emitters": EMITTERS,
        "partitions": 16,
        "nats_server_sync": "always",
        "backends": {
            "nats": "2 Postgres shards + NatsStreams",
            "memory": "2 SQLite shards + MemoryStreams",
        },
        "rows": rows,
    }


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(measure(quick))


def render(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"Events end to end: {result['emitters']} emitters, "
        f"{result['seconds_per_phase']:g} s per phase, {result['partitions']} partitions",
        caption="emit/s, done/s: events emitted, handled per second; p50..p99: ms from emit "
        "commit to handler start; fixed rate offers ½ the closed loop's done/s",
    )
    table.add_column("backend, mode", no_wrap=True)
    for column in ("events", "emit/s", "done/s", "p50", "p95", "p99"):
        table.add_column(column, justify="right", no_wrap=True)
    for backend, phases in result["rows"].items():
        for r in phases:
            lat = [r["latency_ms"][p] for p in ("p50", "p95", "p99")]
            table.add_row(
                f"{backend}, {r['mode']}",
                f"{r['events']:,}",
                rate(r["emitted_per_s"]),
                rate(r["handled_per_s"]),
                *(f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" for ms in lat),
            )
    return table


if __name__ == "__main__":
    raise SystemExit(run_main("events_e2e", __doc__ or "", run, render))
