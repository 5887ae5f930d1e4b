"""The embedded engine keeps the stalled-shard guarantee: a SQLite shard whose write
lock is held costs only its own writes.

`test_arena_shard_down.py` stalls a PostgreSQL shard with `LOCK TABLE`; a SQLite
file in WAL mode stalls its writers when another process holds its write lock
(`BEGIN IMMEDIATE`). Here a side connection (as another process would) holds
s1's lock for three query deadlines while 8 tasks write to each shard: every
write to s0 succeeds, none slower than the deadline; writes to s1 fail with a
typed 503-class error (`ShardTimeout`, `ShardBusy`, or `ShardUnavailable` once
its breaker opens) within a bounded time; the stalled shard is named in a log
line; and s1 writes again once the lock goes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tenfold.errors import ShardTimeout, ShardUnavailable

DEADLINE_S = 0.5


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_locked_sqlite_shard_costs_only_its_own_writes(
    make_db: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = await make_db(shards=2, query_timeout_s=DEADLINE_S)
    for shard in db.shard_names:
        async with db.shard(shard) as conn:
            await conn.execute("CREATE TABLE notes (k INTEGER NOT NULL)")
    path = db.settings.shards[1].url.removeprefix("sqlite:///")
    caplog.set_level(logging.WARNING, logger="tenfold.data")
    outcomes: dict[str, list[tuple[bool, float]]] = {"s0": [], "s1": []}

    async def writer(shard: str, until: float) -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                async with db.shard(shard) as conn, conn.transaction():
                    await conn.execute("INSERT INTO notes (k) VALUES ($1)", 1)
                ok = True
            except (ShardTimeout, ShardUnavailable):  # busy, past its deadline, breaker open
                ok = False
            outcomes[shard].append((ok, time.monotonic() - started))
            await asyncio.sleep(0.005)

    side = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        side.execute("BEGIN IMMEDIATE")  # the write lock, as another process would hold it
        until = time.monotonic() + 3 * DEADLINE_S
        await asyncio.gather(*(writer(s, until) for s in ("s0", "s1") for _ in range(8)))
    finally:
        side.execute("ROLLBACK")
        side.close()

    healthy, stalled = outcomes["s0"], outcomes["s1"]
    assert healthy and all(ok for ok, _ in healthy), [t for ok, t in healthy if not ok][:5]
    assert max(t for _, t in healthy) < DEADLINE_S, max(t for _, t in healthy)
    assert stalled and not any(ok for ok, _ in stalled)
    # The deadline (plus scheduling) bounds each; later ones are refused at once.
    assert max(t for _, t in stalled) < 2 * DEADLINE_S + 0.5
    named = [r.getMessage() for r in caplog.records if r.name == "tenfold.data"]
    assert any("shard s1" in m for m in named), named
    assert not any("shard s0" in m for m in named), named

    deadline = time.monotonic() + db.settings.shard_breaker_open_s + 3
    while True:  # the lock is gone: s1 takes writes again once its breaker lets a probe by
        try:
            async with db.shard("s1") as conn, conn.transaction():
                await conn.execute("INSERT INTO notes (k) VALUES ($1)", 2)
            break
        except (ShardTimeout, ShardUnavailable):
            assert time.monotonic() < deadline, "s1 did not recover after the lock went"
            await asyncio.sleep(0.05)
