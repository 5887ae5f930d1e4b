"""Per-slot statistics (tenfold.reshard.stats) on both engines: rows, bytes, write load,
each slot counted once, on its owner, also while a switched move's source keeps a copy."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from tenfold.data import ShardedDatabase
from tenfold.keyspace import slot_of
from tenfold.reshard import MoveOptions, Mover
from tenfold.reshard.stats import copy_speed, slot_stats
from tests.integration.support import seed_arena_users

ARENA = Path(__file__).resolve().parents[2] / "apps" / "arena" / "migrations"


async def _seed(db: ShardedDatabase, n: int) -> Counter[int]:
    """`n` users with wallets: two rows per user in the user's slot."""
    names = await seed_arena_users(db, n, password_hash="x" * 30)
    return Counter({slot: 2 * c for slot, c in Counter(slot_of(n) for n in names).items()})


async def _outbox(db: ShardedDatabase, slot: int, n: int, created_at: float) -> None:
    async with db.shard_for_slot(slot) as conn:
        for _ in range(n):
            await conn.execute(
                "INSERT INTO tenfold_outbox (event_id, topic, event_key, slot, payload, "
                "created_at) VALUES ($1, 't', 'k', $2, $3, $4)",
                f"ev-{time.time_ns()}",
                slot,
                b"{}",
                created_at,
            )


async def test_rows_bytes_and_load_per_slot_each_counted_on_its_owner(make_db: Any) -> None:
    db = await make_db(shards=2, migrations_dir=str(ARENA))
    per_slot = await _seed(db, 150)
    now = time.time()
    await _outbox(db, 5, 3, now)
    await _outbox(db, 5, 1, now - 7200)  # outside the hour: not load
    await _outbox(db, 3000, 2, now - 60)

    stats = await slot_stats(db)
    assert dict(stats.rows) == dict(per_slot)
    assert set(stats.bytes) == set(per_slot)
    # Each user row carries a 30-character hash and a name: well over 30 bytes a user.
    assert all(stats.bytes[s] > 15 * per_slot[s] for s in per_slot)
    assert dict(stats.load) == {5: 3, 3000: 2}
    speed = await copy_speed(db, stats)
    assert speed.rows_s is not None and speed.rows_s > 0
    assert speed.method.startswith("measured by timing a read of")

    # After a switch the source still holds its copy until `complete`: counted once.
    mover = Mover(db, MoveOptions(batch_rows=100, duty=1.0, complete_after_s=0))
    [move] = await mover.move("0-255", "s1")
    assert move.state == "switched"
    again = await slot_stats(db)
    assert dict(again.rows) == dict(per_slot)
    await mover.complete(move.id)
    speed = await copy_speed(db, await slot_stats(db))
    assert speed.method == f"measured by move {move.id} (s0->s1)"
    assert speed.rows_s == move.progress.get("copy_rows_s")
