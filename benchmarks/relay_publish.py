"""Relay publish rate: tenfold's `OutboxRelay` against raw nats-py and FastStream.

Measured: messages/s (and this process's CPU µs per message) to get N = 20,000
events (2,000 with `--quick`) into one JetStream stream, each acknowledged by a
PubAck. Sides:

- raw nats-py (the limit): `js.publish_async(subject, payload, headers={"Nats-Msg-Id":
  id})`, then await the acks, in batches of the relay batch size (256) and fully
  pipelined (bounded by nats-py's 4,000 pending); "raw" is the faster median.
- FastStream (the peer): `await NatsBroker.publish(payload, subject, headers=...,
  stream=...)`, its documented JetStream publish, which awaits each PubAck before
  the next call; FastStream has no batch publish for NATS (`publish_batch` raises
  `FeatureNotSupportedException`), so "FastStream ×256 gather" (an
  `asyncio.gather` of 256 `publish` calls, user code) is shown as well. The
  broker is connected, not started: `start()` with a stream publisher would
  re-declare the stream with FastStream's defaults (no max_age, no limits).
- tenfold: the rows wait in a Postgres shard's `tenfold_outbox` (inserted with
  executemany before timing); timed is `await OutboxRelay.drain()`: read a batch,
  publish it pipelined, mark it published, until the outbox is empty. Batch 256
  (the default `relay_batch_size`) and 1024.
Goals of issue 3: tenfold / raw ≥ 0.60 and tenfold / FastStream ≥ 1.5 (tenfold at
its default batch size against the faster raw mode and FastStream's normal
path, on the `sync_interval: always` server).

Why it is fair: one server (the pinned nats-server, `sync_interval: always`, the
durability tenfold documents), one stream config (tenfold's own: file storage,
16 subjects `tf.bench.relay.<p>`, 120 s duplicate window), dropped and recreated
empty before every run; the same payload (~200 bytes of JSON), subjects and
fresh message ids for every side; each side keeps its own connection, opened
before timing. Rounds alternate the sides; medians are reported. tenfold also
pays for what only it does: reading and marking rows in Postgres (default
`synchronous_commit`), confirming the stream on its first pass, and four more
headers per message (event id, key, slot, created). The same sides (without the
extra variants) also run on a server with the default sync, shown separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import orjson
from faststream.nats import NatsBroker
from rich.table import Table

from benchmarks._common import console, median, sides_table
from benchmarks._common import main as run_main
from benchmarks._nats import Server, nats_server, pg_databases
from tenfold.config import Settings, ShardSpec
from tenfold.data.router import ShardedDatabase
from tenfold.events.base import TopicSpec
from tenfold.events.nats import NatsStreams, dlq_stream_name, stream_name
from tenfold.events.outbox import new_event_id
from tenfold.events.relay import OutboxRelay
from tenfold.keyspace import slot_of

SPEC = TopicSpec("bench.relay", partitions=16)
STREAM = stream_name(SPEC.name)
BATCH = Settings().relay_batch_size
PAYLOAD = orjson.dumps({"kind": "message", "room": "room:42", "text": "lorem ipsum " * 13})
RAW, PEER, TENFOLD = "raw", "FastStream", f"tenfold, batch {BATCH}"
GOALS = {"raw": 0.60, "faststream": 1.5}
INSERT = (
    "INSERT INTO tenfold_outbox (event_id, topic, event_key, slot, payload, headers, created_at) "
    "VALUES ($1, $2, $3, $4, $5, NULL, $6)"
)
Msg = tuple[str, str, int, str]  # event id, key, slot, subject
Sample = tuple[float, float]  # msgs/s, client CPU µs per message
Publish = Callable[[list[Msg]], Awaitable[int]]
Prepare = Callable[[list[Msg]], Awaitable[None]]


def make_messages(n: int) -> list[Msg]:
    slots = ((f"user:{i}", slot_of(f"user:{i}")) for i in range(n))
    return [(new_event_id(), k, s, f"tf.{SPEC.name}.{SPEC.partition_of(s)}") for k, s in slots]


class Bench:
    """The connections of every side to one server, and a shard with the outbox."""

    def __init__(self, url: str, db: ShardedDatabase) -> None:
        self.url, self.db = url, db
        self.admin, self.relay_backend = NatsStreams(url), NatsStreams(url)
        self.broker = NatsBroker(url)  # no broker.start(): it would redeclare the stream
        self.nc: Any = None

    async def __aenter__(self) -> Bench:
        await self.admin.start()
        await self.relay_backend.start()
        await self.broker.connect()
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.drop_streams()
        finally:
            await self.broker.stop()
            await self.nc.close()
            await self.relay_backend.close()
            await self.admin.close()

    async def drop_streams(self) -> None:
        for name in (STREAM, dlq_stream_name(SPEC.name)):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.admin._jetstream().delete_stream(name)

    async def timed(self, n: int, publish: Publish, prepare: Prepare | None = None) -> Sample:
        """Fresh stream and ids, `prepare` (untimed), then time `publish` and check the stream."""
        msgs = make_messages(n)
        if prepare is not None:
            await prepare(msgs)
        await self.drop_streams()
        await self.admin.ensure_topic(SPEC)
        gc.collect()
        cpu, start = time.process_time(), time.perf_counter()
        done = await publish(msgs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        stored = (await self.admin._jetstream().stream_info(STREAM)).state.messages
        assert done == stored == n, f"published {done}, stream holds {stored}, expected {n}"
        return n / wall, cpu / n * 1e6

    async def raw(self, msgs: list[Msg], batch: int) -> int:
        for i in range(0, len(msgs), batch):
            futures = [
                await self.js.publish_async(subject, PAYLOAD, headers={"Nats-Msg-Id": eid})
                for eid, _, _, subject in msgs[i : i + batch]
            ]
            await asyncio.gather(*futures)
        return len(msgs)

    async def faststream(self, msgs: list[Msg], concurrency: int = 1) -> int:
        async def one(eid: str, subject: str) -> None:
            await self.broker.publish(
                PAYLOAD, subject, headers={"Nats-Msg-Id": eid}, stream=STREAM, timeout=5.0
            )

        for i in range(0, len(msgs), concurrency):
            await asyncio.gather(*(one(m[0], m[3]) for m in msgs[i : i + concurrency]))
        return len(msgs)

    async def fill_outbox(self, msgs: list[Msg]) -> None:
        async with self.db.shard("s0") as conn:
            await conn.execute("TRUNCATE tenfold_outbox")
            rows = [(eid, SPEC.name, key, slot, PAYLOAD, time.time()) for eid, key, slot, _ in msgs]
            await conn.executemany(INSERT, rows)
            await conn.execute("VACUUM ANALYZE tenfold_outbox")

    async def tenfold(self, n: int, batch: int) -> Sample:
        relay = OutboxRelay(self.db, "s0", self.relay_backend, {SPEC.name: SPEC}, batch_size=batch)
        sample = await self.timed(n, lambda _: relay.drain(timeout_s=600), self.fill_outbox)
        assert await relay.pending() == 0, "the relay left rows behind"
        return sample

    def sides(self, n: int, full: bool) -> dict[str, Callable[[], Awaitable[Sample]]]:
        sides: dict[str, Callable[[], Awaitable[Sample]]] = {
            f"{RAW}, batch {BATCH}": lambda: self.timed(n, lambda m: self.raw(m, BATCH)),
            f"{RAW}, pipelined": lambda: self.timed(n, lambda m: self.raw(m, len(m))),
            PEER: lambda: self.timed(n, self.faststream),
            TENFOLD: lambda: self.tenfold(n, BATCH),
        }
        if full:
            sides[f"{PEER} ×{BATCH} gather"] = lambda: self.timed(
                n, lambda m: self.faststream(m, BATCH)
            )
            sides["tenfold, batch 1024"] = lambda: self.tenfold(n, 1024)
        return sides


async def compare(server: Server, db: ShardedDatabase, n: int, rounds: int, full: bool) -> dict:
    async with Bench(server.url, db) as bench:
        sides = bench.sides(n, full)
        samples: dict[str, list[Sample]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name, side in sides.items():
                samples[name].append(await side())
    rates = {name: [s[0] for s in v] for name, v in samples.items()}
    med = {name: median(v) for name, v in rates.items()}
    raw_name = max((k for k in med if k.startswith(RAW)), key=med.__getitem__)
    return {
        "nats_sync": server.sync,
        "rounds": rounds,
        "msgs_per_s_median": med,
        "msgs_per_s_rounds": rates,
        "client_cpu_us_per_msg_median": {k: median([s[1] for s in v]) for k, v in samples.items()},
        "raw_side": raw_name,
        "ratio_tenfold_vs_raw": med[TENFOLD] / med[raw_name],
        "ratio_tenfold_vs_faststream": med[TENFOLD] / med[PEER],
    }


async def measure(quick: bool) -> dict[str, Any]:
    n, rounds = (2_000, 3) if quick else (20_000, 3)
    async with pg_databases(2) as (catalog, shard):
        settings = Settings(catalog_url=catalog, shards=[ShardSpec(name="s0", url=shard)])
        db = ShardedDatabase(settings)
        try:
            await db.open(ids=False)
            await db.migrate()
            with nats_server() as server:
                always = await compare(server, db, n, rounds, full=True)
                meta = {"nats_server": server.version, "binary": server.binary}
            with nats_server(sync_always=False) as server:
                default = await compare(server, db, n, rounds, full=False)
        finally:
            await db.close()
    ratios = {k: always[f"ratio_tenfold_vs_{k}"] for k in GOALS}
    return {
        "messages": n,
        "payload_bytes": len(PAYLOAD),
        "partitions": SPEC.partitions,
        "relay_batch_size": BATCH,
        **meta,
        "sync_always": always,
        "sync_default": default,
        "goals": {
            k: {"min_ratio": g, "ratio": ratios[k], "met": ratios[k] >= g} for k, g in GOALS.items()
        },
    }


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(measure(quick))


def render(result: dict[str, Any]) -> Table:
    """Print the sync-always table (the goals); return the default-sync one."""
    tables = []
    for part, title in (("sync_always", "sync_interval: always"), ("sync_default", "default sync")):
        r = result[part]
        tables.append(
            sides_table(
                f"Relay publish, server {title}: {result['messages']:,} msgs of "
                f"{result['payload_bytes']} B, median of {r['rounds']} rounds",
                f"tenfold/raw {r['ratio_tenfold_vs_raw']:.2f}, "
                f"tenfold/FastStream {r['ratio_tenfold_vs_faststream']:.2f}",
                "msgs/s",
                r["msgs_per_s_rounds"],
                r["raw_side"],
                {"CPU µs/msg": r["client_cpu_us_per_msg_median"]},
            )
        )
    console.print(tables[0])
    return tables[1]


def goal_lines(result: dict[str, Any]) -> list[str]:
    names = {"raw": "raw nats-py", "faststream": "FastStream"}
    lines = [
        f"relay publish tenfold / {names[k]} ≥ {g['min_ratio']:g}: "
        f"{'met' if g['met'] else 'NOT met'} ({g['ratio']:.2f})"
        for k, g in result["goals"].items()
    ]
    d = result["sync_default"]
    lines.append(
        f"(for information, server default sync: tenfold / raw {d['ratio_tenfold_vs_raw']:.2f}, "
        f"tenfold / FastStream {d['ratio_tenfold_vs_faststream']:.2f})"
    )
    return lines


if __name__ == "__main__":
    raise SystemExit(run_main("relay_publish", __doc__ or "", run, render))
