"""A slot move end to end on both engines: copy, catch-up, verify, switch, complete, reverse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tenfold.data import ShardedDatabase
from tenfold.errors import SlotMoved
from tenfold.keyspace import slot_of
from tenfold.reshard import MoveOptions, Mover

ARENA = Path(__file__).resolve().parents[2] / "apps" / "arena" / "migrations"


async def _seed(db: ShardedDatabase, n: int) -> dict[str, int]:
    balances = {}
    for i in range(n):
        name = f"user{i}"
        uid = db.new_id(name)
        async with db.shard_for(name) as conn, conn.transaction():
            await conn.insert(
                "arena_users",
                {"id": uid, "username": name, "password_hash": "x", "created_at": 1.0},
            )
            await conn.insert("arena_wallets", {"user_id": uid, "balance": 100 + i})
        balances[name] = 100 + i
    return balances


async def _dump(db: ShardedDatabase) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for table, _key in (("arena_users", "id"), ("arena_wallets", "user_id")):
        rows = []
        for name in db.shard_names:
            async with db.shard(name) as conn:
                for r in await conn.fetch(f"SELECT * FROM {table}"):
                    if db.topology.shard_of_slot(r["slot"]) == name:
                        rows.append(tuple(r))
        out[table] = sorted(rows, key=lambda r: r[1])
    return out


async def test_move_switch_complete_keeps_every_row(make_db: Any) -> None:
    db = await make_db(shards=2, migrations_dir=str(ARENA))
    await _seed(db, 300)
    before = await _dump(db)
    mover = Mover(db, MoveOptions(batch_rows=50, duty=1.0, complete_after_s=0))
    [move] = await mover.move("0-255", "s1", until="completed")
    assert move.state == "completed", move
    assert all(db.topology.shard_of_slot(s) == "s1" for s in range(256))
    after = await _dump(db)
    assert after == before
    # The source kept nothing of the moved slots, and refuses writes to them.
    async with db.shard("s0") as conn:
        left = await conn.fetchval("SELECT count(*) FROM arena_users WHERE slot < 256")
    assert left == 0
    name = next(f"u{i}" for i in range(10_000) if slot_of(f"u{i}") < 256)
    with pytest.raises(SlotMoved):
        async with db.shard("s0") as conn:
            conn.slot = slot_of(name)
            await conn.insert(
                "arena_users", {"id": 1, "username": name, "password_hash": "x", "created_at": 1.0}
            )


async def test_reverse_returns_slots_with_changes_made_after_switch(make_db: Any) -> None:
    db = await make_db(shards=2, migrations_dir=str(ARENA))
    balances = await _seed(db, 200)
    mover = Mover(db, MoveOptions(batch_rows=40, duty=1.0))
    [move] = await mover.move("0-511", "s1")
    assert move.state == "switched"
    moved = [n for n in balances if slot_of(n) < 512]
    assert moved
    for name in moved:
        async with db.shard_for(name) as conn:
            await conn.execute(
                "UPDATE arena_wallets SET balance = balance + 1 WHERE user_id = "
                "(SELECT id FROM arena_users WHERE username = $1)",
                name,
            )
        balances[name] += 1
    reversed_ = await mover.reverse(move.id)
    assert reversed_.state == "reversed"
    assert all(db.topology.shard_of_slot(s) == "s0" for s in range(512))
    for name, want in balances.items():
        async with db.shard_for(name) as conn:
            got = await conn.fetchval(
                "SELECT w.balance FROM arena_wallets w JOIN arena_users u ON u.id = w.user_id "
                "WHERE u.username = $1",
                name,
            )
        assert got == want, name
