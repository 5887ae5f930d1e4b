"""Per-slot statistics of a sharded database: what `tenfold shards plan` balances.

    stats = await slot_stats(db)
    stats.rows[17], stats.bytes[17], stats.load[17]

Each shard is asked concurrently, one `GROUP BY slot` query per slot table
(`tenfold.reshard.tables.slot_tables`), so only per-slot sums come back, never
rows. A shard's figures count only the slots it owns in the current topology:
rows a switched-but-not-completed move left on its old owner are not counted
twice.

- rows: rows per slot, summed over every slot table.
- bytes: on PostgreSQL `sum(pg_column_size(t.*))`, the stored size of each row
  (after TOAST compression, without page and index overhead). On SQLite an
  estimate: the sum of `length()` of every column of every row (bytes of
  blobs, characters of text, digits of numbers; NULL as 0), which SQLite can
  compute without the `dbstat` extension. Compare bytes across shards of one
  engine only.
- load: events written per slot in the last `load_window_s` (an hour), counted
  from `tenfold_outbox.created_at`: a write-load proxy (every write that
  announces an event writes an outbox row), not a measure of reads.

`copy_speed` gives the rows/s a move's copy is expected to reach, for the
planner's time estimates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tenfold.data.base import Pool
from tenfold.keyspace import Topology
from tenfold.reshard import rows as row_ops
from tenfold.reshard.store import MoveStore
from tenfold.reshard.tables import OUTBOX, SlotTable, slot_tables

if TYPE_CHECKING:
    from tenfold.data.router import ShardedDatabase

__all__ = ["CopySpeed", "SlotStats", "copy_speed", "shard_slot_stats", "slot_stats"]

LOAD_WINDOW_S = 3600.0
SAMPLE_ROWS = 5000


@dataclass(frozen=True)
class SlotStats:
    """Per-slot sums over the cluster (slots with nothing are absent: read as 0)."""

    rows: Mapping[int, int] = field(default_factory=dict)
    bytes: Mapping[int, int] = field(default_factory=dict)
    load: Mapping[int, int] = field(default_factory=dict)
    load_window_s: float = LOAD_WINDOW_S
    bytes_method: str = ""

    def of(self, by: str) -> Mapping[int, int]:
        """The per-slot figure called `by`: "rows", "bytes" or "load"."""
        if by == "rows":
            return self.rows
        if by == "bytes":
            return self.bytes
        if by == "load":
            return self.load
        raise ValueError(f"unknown statistic {by!r}: rows, bytes or load")


@dataclass(frozen=True)
class CopySpeed:
    """Expected copy rows/s and how it was found (printed with every estimate)."""

    rows_s: float | None
    method: str


def _bytes_expr(pool: Pool, table: SlotTable) -> str:
    if pool.dialect == "sqlite":
        parts = [f'coalesce(length("{c}"), 0)' for c in table.columns]
        return " + ".join(parts) or "0"
    return "pg_column_size(t.*)"


async def _has_table(pool: Pool, name: str) -> bool:
    async with pool.acquire() as conn:
        if pool.dialect == "sqlite":
            found = await conn.fetchval(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1", name
            )
        else:
            found = await conn.fetchval(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_name = $1",
                name,
            )
    return bool(found)


async def shard_slot_stats(
    pool: Pool, *, since: float | None = None
) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """(rows, bytes, load) per slot of one shard database, every slot it holds rows of.

    `since`: the start of the load window (epoch seconds; default an hour ago).
    """
    since = time.time() - LOAD_WINDOW_S if since is None else since
    rows: dict[int, int] = {}
    size: dict[int, int] = {}
    load: dict[int, int] = {}
    for table in await slot_tables(pool):
        sql = (
            f"SELECT slot, count(*), sum({_bytes_expr(pool, table)}) "
            f"FROM {table.name} t GROUP BY slot"
        )
        async with pool.acquire() as conn:
            found = await conn.fetch(sql)
        for r in found:
            slot = int(r[0])
            rows[slot] = rows.get(slot, 0) + int(r[1])
            size[slot] = size.get(slot, 0) + int(r[2] or 0)
    if await _has_table(pool, OUTBOX):
        async with pool.acquire() as conn:
            found = await conn.fetch(
                f"SELECT slot, count(*) FROM {OUTBOX} WHERE created_at >= $1 GROUP BY slot",
                since,
            )
        for r in found:
            load[int(r[0])] = load.get(int(r[0]), 0) + int(r[1])
    return rows, size, load


async def slot_stats(db: ShardedDatabase, *, load_window_s: float = LOAD_WINDOW_S) -> SlotStats:
    """Rows, bytes and write load per slot of every shard, each counted on its owner.

    Raises:
        DataError: a shard did not answer (named).
    """
    await db.refresh_topology()
    topology: Topology = db.topology
    names = [n for n in topology.shards if n in db.shard_names]
    since = time.time() - load_window_s
    found = await asyncio.gather(*(shard_slot_stats(db.pool(n), since=since) for n in names))
    rows: dict[int, int] = {}
    size: dict[int, int] = {}
    load: dict[int, int] = {}
    for name, (r, b, w) in zip(names, found, strict=True):
        for part, into in ((r, rows), (b, size), (w, load)):
            for slot, n in part.items():
                if 0 <= slot < 4096 and topology.shard_of_slot(slot) == name:
                    into[slot] = into.get(slot, 0) + n
    dialects = {db.pool(n).dialect for n in names}
    method = (
        "pg_column_size of each row"
        if dialects == {"postgresql"}
        else "sum of length() of each column (an estimate)"
        if dialects == {"sqlite"}
        else "pg_column_size on PostgreSQL shards, length() of each column on SQLite"
    )
    return SlotStats(rows, size, load, load_window_s, method)


async def copy_speed(
    db: ShardedDatabase, stats: SlotStats, sources: list[str] | None = None
) -> CopySpeed:
    """The copy rows/s to expect: the newest completed move's measured copy speed,
    else the time of a read of up to 5,000 rows from the biggest source (the copy's
    own keyset scan; a read alone, so an upper bound: the copy also writes them and
    pauses by its duty cycle)."""
    moves = await MoveStore(db.catalog).all()
    for move in sorted(moves, key=lambda m: m.updated_at, reverse=True):
        speed = move.progress.get("copy_rows_s")
        if move.state == "completed" and speed:
            return CopySpeed(
                float(speed), f"measured by move {move.id} ({move.source}->{move.target})"
            )
    topology = db.topology
    candidates = sources or list(topology.shards)
    per_shard = {n: 0 for n in candidates if n in db.shard_names}
    for slot, n in stats.rows.items():
        owner = topology.shard_of_slot(slot)
        if owner in per_shard:
            per_shard[owner] += n
    if not per_shard or max(per_shard.values()) == 0:
        return CopySpeed(None, "no rows to measure a copy speed by")
    biggest = max(per_shard, key=lambda n: (per_shard[n], -candidates.index(n)))
    pool = db.pool(biggest)
    ranges = [(r.first, r.last) for r in topology.slots_of(biggest)]
    read = 0
    started = time.perf_counter()
    for table in await slot_tables(pool):
        async for batch, _ in row_ops.scan(pool, table, ranges, None, 1000):
            read += len(batch)
            if read >= SAMPLE_ROWS:
                break
        if read >= SAMPLE_ROWS:
            break
    elapsed = time.perf_counter() - started
    if read == 0 or elapsed <= 0:
        return CopySpeed(None, f"no rows on {biggest} to measure a copy speed by")
    return CopySpeed(
        read / elapsed,
        f"measured by timing a read of {read} rows from {biggest} "
        "(no completed move yet; a read only, so the copy will take longer)",
    )
