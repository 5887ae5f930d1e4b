"""A cancelled SQLite transaction never leaves an idle connection holding the write lock."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tenfold.data.base import PoolOptions, pool_from_url


async def test_cancelled_begin_leaves_no_write_lock_behind(tmp_path: Path) -> None:
    options = PoolOptions(max_size=4, query_timeout_s=3.0, acquire_timeout_s=2.0)
    pool = pool_from_url("s0", f"sqlite:///{tmp_path}/s0.db", options)
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE t (slot INTEGER, v INTEGER)")
    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO t VALUES (0, 1)")
            holding.set()
            await release.wait()

    async def waiter() -> None:
        # BEGIN IMMEDIATE blocks in the connection's thread behind the holder
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO t VALUES (0, 2)")

    held = asyncio.create_task(holder())
    await holding.wait()
    blocked = asyncio.create_task(waiter())
    await asyncio.sleep(0.2)
    blocked.cancel()  # the await ends; the BEGIN still runs once the lock frees
    await asyncio.gather(blocked, return_exceptions=True)
    release.set()
    await held
    await asyncio.sleep(0.2)  # the queued BEGIN (and the rollback behind it) have run
    for n in range(4):  # every pooled connection can take the write lock at once
        async with asyncio.timeout(1.5), pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO t VALUES (0, $1)", 10 + n)
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT v FROM t ORDER BY v")
    assert [r["v"] for r in rows] == [1, 10, 11, 12, 13]  # the cancelled insert left nothing
    await pool.close()
