"""Small helpers shared by the integration tests (not fixtures: see tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tenfold import ShardedDatabase
from tenfold.config import Settings, ShardSpec


class FakeClock:
    """A monotonic clock the test moves by hand (`clock.now += 5`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def opened(
    settings: Settings, clock: FakeClock | None = None
) -> AsyncIterator[ShardedDatabase]:
    """An open `ShardedDatabase` on `settings`, closed when the block ends."""
    db = ShardedDatabase(settings, **({"clock": clock} if clock is not None else {}))
    await db.open()
    try:
        yield db
    finally:
        await db.close()


def key_on(db: ShardedDatabase, shard: str, prefix: str = "k") -> str:
    """The first key `{prefix}{i}` that the current topology routes to `shard`."""
    return next(
        f"{prefix}{i}" for i in range(1_000_000) if db.shard_name_for(f"{prefix}{i}") == shard
    )


def free_port() -> int:
    """A local TCP port with nothing listening on it (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_shards(settings: Settings, shards: list[ShardSpec]) -> Settings:
    return settings.model_copy(update={"shards": shards})


async def wait_until(
    condition: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll `condition` (sync or async) until it is truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def seed_arena_users(db: Any, n: int, *, password_hash: str = "x") -> dict[str, int]:
    """`n` arena users `user0..` with wallets of 100 + i points; name -> balance."""
    balances = {}
    for i in range(n):
        name = f"user{i}"
        uid = db.new_id(name)
        async with db.shard_for(name) as conn, conn.transaction():
            await conn.insert(
                "arena_users",
                {"id": uid, "username": name, "password_hash": password_hash, "created_at": 1.0},
            )
            await conn.insert("arena_wallets", {"user_id": uid, "balance": 100 + i})
        balances[name] = 100 + i
    return balances
