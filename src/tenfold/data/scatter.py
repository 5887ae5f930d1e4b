"""Scatter-gather: one query on many shards at once, with per-shard results and a merge."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenfold.data.base import Record
from tenfold.errors import ScatterError, ShardTimeout, TenfoldError

__all__ = ["ScatterResult", "gather_shards", "merge_rows"]


@dataclass
class ScatterResult:
    """What a scatter returned: rows per shard, failures per shard, and the merge.

    `rows` is every shard's rows merged: ordered by `order_by` and cut to
    `limit` when those were given, else concatenated in shard order.
    """

    by_shard: dict[str, list[Record]]
    failed: dict[str, TenfoldError] = field(default_factory=dict)
    rows: list[Record] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed


def merge_rows(
    by_shard: dict[str, list[Record]],
    order_by: str | Sequence[str] | Callable[[Record], Any] | None,
    *,
    descending: bool = False,
    limit: int | None = None,
) -> list[Record]:
    """Merge per-shard rows into one list ordered by columns or a key function.

    Shards need not return sorted rows; with a limit only `limit` rows are kept
    in a heap (O(n log limit)), so a top-k across shards stays cheap.
    """
    chunks = [by_shard[name] for name in sorted(by_shard)]
    if order_by is None:
        merged = [row for chunk in chunks for row in chunk]
        return merged if limit is None else merged[:limit]
    key = _key_function(order_by)
    everything = (row for chunk in chunks for row in chunk)
    if limit is not None:
        pick = heapq.nlargest if descending else heapq.nsmallest
        return pick(limit, everything, key=key)
    return sorted(everything, key=key, reverse=descending)


def _key_function(
    order_by: str | Sequence[str] | Callable[[Record], Any],
) -> Callable[[Record], Any]:
    if callable(order_by):
        return order_by
    if isinstance(order_by, str):
        column = order_by
        return lambda row: row[column]
    columns = tuple(order_by)
    return lambda row: tuple(row[c] for c in columns)


async def gather_shards(
    names: Sequence[str],
    run: Callable[[str], Awaitable[list[Record]]],
    *,
    timeout_s: float,
    partial: bool,
) -> tuple[dict[str, list[Record]], dict[str, TenfoldError]]:
    """Run `run(name)` for every shard concurrently, each bounded by `timeout_s`."""

    async def one(name: str) -> list[Record]:
        try:
            async with asyncio.timeout(timeout_s):
                return await run(name)
        except TimeoutError:
            raise ShardTimeout(name, timeout_s, "scatter query") from None

    results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
    by_shard: dict[str, list[Record]] = {}
    failed: dict[str, TenfoldError] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, TenfoldError):
            failed[name] = result
        elif isinstance(result, BaseException):
            raise result
        else:
            by_shard[name] = result
    if failed and not partial:
        raise ScatterError(dict(failed))
    return by_shard, failed
