"""Moving rows: keyset scans of a slot range, the copy, catch-up applies, the diff.

Every write to the target runs in `ShardSide.applying` (the target refuses
other writes to slots it does not own yet) and replaces a key range or a key
set as a whole (delete, then insert), so running a step twice, after the
mover died between the write and its checkpoint, leaves the same rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import xxhash

from tenfold.data.base import Connection, Pool, Record
from tenfold.reshard.capture import ShardSide
from tenfold.reshard.tables import SlotTable

__all__ = [
    "Diff",
    "apply_keys",
    "compare",
    "copy_batch",
    "copy_batches",
    "delete_keys",
    "digest",
    "read_keys",
    "scan",
]

Key = list[Any]  # [slot, *primary key values]: a row's place in the keyset order


def _marks(pool: Pool, table: SlotTable, start: int) -> list[str]:
    """Placeholders for a keyset position, cast on PostgreSQL (row comparisons need types)."""
    names = table.order
    if pool.dialect == "sqlite":
        return [f"${start + i}" for i in range(len(names))]
    types = dict(zip(table.pk, table.pk_types, strict=False))
    types.setdefault("slot", "integer")
    return [f"${start + i}::{types[c]}" for i, c in enumerate(names)]


def key_of(table: SlotTable, row: Record) -> Key:
    return [row[c] for c in table.order]


async def _fetch_window(
    pool: Pool, table: SlotTable, lo: int, hi: int, after: Key | None, limit: int
) -> list[Record]:
    order = ", ".join(table.order)
    sql = f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE slot BETWEEN $1 AND $2"
    args: list[Any] = [lo, hi]
    if after is not None:
        sql += f" AND ({order}) > ({', '.join(_marks(pool, table, 3))})"
        args += after
    sql += f" ORDER BY {order} LIMIT {int(limit)}"
    async with pool.acquire() as conn:
        return await conn.fetch(sql, *args)


async def scan(
    pool: Pool,
    table: SlotTable,
    ranges: Sequence[tuple[int, int]],
    after: Key | None,
    batch: int,
    width: int = 16,
) -> AsyncIterator[tuple[list[Record], Key]]:
    """Rows of `table` in `ranges` after `after`, in (slot, key) order, a batch at a time.

    Yields each batch with its last key (the checkpoint). The query covers a
    window of slots that grows while windows come back small and shrinks when
    one fills: the slot index bounds each query to its window, so the sort by
    (slot, key) never covers the whole move (O(rows) in all, not O(rows^2)).
    """
    windows = _Windows(ranges, after, width)
    for start, end, key in windows:
        rows = await _fetch_window(pool, table, start, end, key, batch)
        last = key_of(table, rows[-1]) if rows else None
        windows.took(last, full=len(rows) == batch, small=len(rows) < batch // 2)
        if last is not None:
            yield rows, last


class _Windows:
    """Windows of slots over `ranges`, after a keyset position.

    A window grows while windows come back small and shrinks when one fills
    (the next one reads the same window after the last key): the slot index
    bounds each query to its window, so the sort by (slot, key) never covers
    the whole move (O(rows) in all, not O(rows^2)). Tell it each window's
    outcome with `took` before asking for the next.
    """

    def __init__(self, ranges: Sequence[tuple[int, int]], after: Key | None, width: int) -> None:
        self.ranges = ranges
        self.after = after
        self.width = width
        self._full = False

    def __iter__(self) -> Iterator[tuple[int, int, Key | None]]:
        for lo, hi in self.ranges:
            if self.after is not None and self.after[0] > hi:
                continue
            start = lo if self.after is None or self.after[0] < lo else int(self.after[0])
            while start <= hi:
                end = min(hi, start + self.width - 1)
                after = self.after
                self._full = False
                yield start, end, after if after is not None and int(after[0]) >= start else None
                if not self._full:
                    start = end + 1

    def took(self, last: Key | None, *, full: bool, small: bool) -> None:
        if last is not None:
            self.after = last
        self._full = full
        if full:
            self.width = max(1, self.width // 2)
        elif small:
            self.width = min(self.width * 2, 4096)


def _range_delete(
    pool: Pool, table: SlotTable, after: Key | None, last: Key, first_slot: int
) -> tuple[str, list[Any]]:
    """DELETE of the target's rows in the key range (after, last] of one batch."""
    order = ", ".join(table.order)
    n = len(table.order)
    sql = f"DELETE FROM {table.name} WHERE ({order}) <= ({', '.join(_marks(pool, table, 1))})"
    args: list[Any] = list(last)
    if after is not None:
        sql += f" AND ({order}) > ({', '.join(_marks(pool, table, n + 1))})"
        args += after
    else:
        sql += f" AND slot >= ${n + 1}"
        args.append(first_slot)
    return sql, args


async def copy_batch(
    target: ShardSide,
    move_id: str,
    table: SlotTable,
    rows: list[Record],
    after: Key | None,
    first_slot: int,
) -> None:
    """Write one scanned batch to the target, replacing its key range (after, last]
    (from `first_slot` when there is no `after`)."""
    sql, args = _range_delete(target.pool, table, after, key_of(table, rows[-1]), first_slot)
    async with target.applying(move_id) as conn:
        await conn.execute(sql, *args)
        await conn.copy_in(table.name, table.columns, [tuple(r) for r in rows])


async def copy_batches(
    source: Pool,
    target: ShardSide,
    move_id: str,
    table: SlotTable,
    ranges: Sequence[tuple[int, int]],
    after: Key | None,
    batch: int,
    width: int = 16,
) -> AsyncIterator[tuple[int, Key]]:
    """Copy `table`'s rows in `ranges` after `after`; yield (rows, checkpoint) per batch.

    PostgreSQL to PostgreSQL moves bytes: the batch's last key comes from an
    index-ordered `LIMIT 1 OFFSET batch-1`, then `COPY (SELECT ...) TO STDOUT
    (binary)` of the range feeds `COPY ... FROM STDIN (binary)` on the target,
    and no row is decoded in Python. Elsewhere rows are fetched and inserted.
    `width`: the first window's slot count (about a batch of rows, if known).
    """
    if source.dialect != "postgresql" or target.pool.dialect != "postgresql":
        for lo, hi in ranges:
            if after is not None and after[0] > hi:
                continue
            # A batch's delete range starts at this range (never in the gap
            # between two ranges, which holds the target's own slots).
            floor = after if after is not None and after[0] >= lo else None
            async for rows, last in scan(source, table, [(lo, hi)], floor, batch, width):
                await copy_batch(target, move_id, table, rows, floor, lo)
                after = floor = last
                yield len(rows), last
        return
    order = ", ".join(table.order)
    desc = ", ".join(f"{c} DESC" for c in table.order)
    cols = ", ".join(table.columns)
    windows = _Windows(ranges, after, width)
    for start, end, key in windows:
        where = "slot BETWEEN $1 AND $2"
        args: list[Any] = [start, end]
        if key is not None:
            where += f" AND ({order}) > ({', '.join(_marks(source, table, 3))})"
            args += key
        async with source.acquire() as conn:
            edge = await conn.fetchrow(
                f"SELECT {order} FROM {table.name} WHERE {where} "
                f"ORDER BY {order} LIMIT 1 OFFSET {int(batch) - 1}",
                *args,
            )
            full = edge is not None
            if edge is None:
                edge = await conn.fetchrow(
                    f"SELECT {order} FROM {table.name} WHERE {where} ORDER BY {desc} LIMIT 1",
                    *args,
                )
            upto = None if edge is None else list(edge)
            data = None
            if upto is not None:
                upper = ", ".join(_marks(source, table, len(args) + 1))
                data = await conn.copy_out(
                    f"SELECT {cols} FROM {table.name} WHERE {where} AND ({order}) <= ({upper})",
                    *args,
                    *upto,
                )
        windows.took(upto, full=full, small=not full)
        if upto is not None and data is not None:
            sql, dargs = _range_delete(target.pool, table, key, upto, start)
            async with target.applying(move_id) as tconn:
                await tconn.execute(sql, *dargs)
                n = await tconn.copy_in_raw(table.name, table.columns, data)
            yield n, upto


def _key_filter(
    pool: Pool, table: SlotTable, keys: Sequence[Sequence[Any]]
) -> tuple[str, list[Any]]:
    width = len(table.pk)
    types = table.pk_types if pool.dialect != "sqlite" else ()
    tuples = []
    args: list[Any] = []
    for k, key in enumerate(keys):
        marks = [f"${k * width + i + 1}" + (f"::{types[i]}" if types else "") for i in range(width)]
        tuples.append(f"({', '.join(marks)})")
        args += list(key)
    cols = ", ".join(table.pk)
    return f"({cols}) IN (VALUES {', '.join(tuples)})", args


async def read_keys(pool: Pool, table: SlotTable, keys: Sequence[Sequence[Any]]) -> list[Record]:
    if not keys:
        return []
    where, args = _key_filter(pool, table, keys)
    async with pool.acquire() as conn:
        return await conn.fetch(
            f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE {where}", *args
        )


async def apply_keys(
    source: Pool, target: ShardSide, move_id: str, table: SlotTable, keys: Sequence[Sequence[Any]]
) -> None:
    """Make the target's rows of `keys` equal the source's current rows (absent: deleted)."""
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        rows = await read_keys(source, table, chunk)
        where, args = _key_filter(target.pool, table, chunk)
        async with target.applying(move_id) as conn:
            await conn.execute(f"DELETE FROM {table.name} WHERE {where}", *args)
            await _insert(conn, table, rows)


async def _insert(conn: Connection, table: SlotTable, rows: list[Record]) -> None:
    await conn.copy_in(table.name, table.columns, [tuple(r) for r in rows])


async def delete_keys(
    side: ShardSide, move_id: str, table: SlotTable, keys: Sequence[Sequence[Any]]
) -> None:
    """Delete `keys` from a shard that does not own their slots (completing, cancelling)."""
    for i in range(0, len(keys), 500):
        where, args = _key_filter(side.pool, table, keys[i : i + 500])
        async with side.applying(move_id) as conn:
            await conn.execute(f"DELETE FROM {table.name} WHERE {where}", *args)


@dataclass
class Diff:
    """A comparison of one table's rows in some slots: per slot counts and checksums."""

    rows: dict[int, list[int]] = field(default_factory=dict)  # slot -> [source, target]
    sums: dict[int, list[int]] = field(default_factory=dict)  # slot -> [source, target]
    keys: list[tuple[int, str, list[Any]]] = field(default_factory=list)  # differing rows

    def add(self, side: int, slot: int, digest: int) -> None:
        self.rows.setdefault(slot, [0, 0])[side] += 1
        sums = self.sums.setdefault(slot, [0, 0])
        sums[side] = (sums[side] + digest) & 0xFFFFFFFFFFFFFFFF  # order-free: a sum


def digest(row: Record) -> int:
    return xxhash.xxh3_64_intdigest(orjson.dumps(list(row), default=str))


async def compare(
    source: Pool,
    target: Pool,
    table: SlotTable,
    ranges: Sequence[tuple[int, int]],
    batch: int,
    group: int = 16,
) -> Diff:
    """Row counts and a content checksum per slot on both sides, and the keys that differ.

    Slots are compared `group` at a time, each side read into a map by key:
    not a merge of the two ordered scans, because PostgreSQL orders text by
    the database's collation, which Python's comparison does not follow.
    """
    diff = Diff()
    for lo, hi in ranges:
        for first in range(lo, hi + 1, group):
            part = [(first, min(hi, first + group - 1))]
            sides: list[dict[tuple[Any, ...], int]] = [{}, {}]
            for side, pool in enumerate((source, target)):
                async for rows, _ in scan(pool, table, part, None, batch):
                    order = table.order  # a property: once per batch, not per row
                    for row in rows:
                        key = tuple(row[c] for c in order)
                        value = digest(row)
                        sides[side][key] = value
                        diff.add(side, int(key[0]), value)
            src, dst = sides
            for key in src.keys() | dst.keys():
                if src.get(key) != dst.get(key):
                    diff.keys.append((int(key[0]), table.name, list(key[1:])))
    return diff
