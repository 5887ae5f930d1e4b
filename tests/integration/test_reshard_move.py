"""A slot move end to end on both engines: copy, catch-up, verify, switch, complete, reverse."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tenfold.data import ShardedDatabase
from tenfold.errors import SlotMoved
from tenfold.ids import slot_of_id
from tenfold.keyspace import slot_of
from tenfold.reshard import MoveOptions, Mover
from tests.integration.support import seed_arena_users

ARENA = Path(__file__).resolve().parents[2] / "apps" / "arena" / "migrations"


async def _seed(db: ShardedDatabase, n: int) -> dict[str, int]:
    return await seed_arena_users(db, n)


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


@pytest.mark.parametrize("batch", [3, 50])
async def test_move_switch_complete_keeps_every_row(make_db: Any, batch: int) -> None:
    db = await make_db(shards=2, migrations_dir=str(ARENA))
    await _seed(db, 300)
    before = await _dump(db)
    mover = Mover(db, MoveOptions(batch_rows=batch, duty=1.0, complete_after_s=0))
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


async def _state(db: ShardedDatabase) -> tuple[int, int]:
    async with db.catalog.pool.acquire() as conn:
        moves = await conn.fetchval("SELECT count(*) FROM tenfold_moves")
    return await db.catalog.current_epoch(), int(moves)


@pytest.mark.parametrize(
    ("slots", "to", "problem"),
    [
        ("0-10,5-20", "s1", "overlap"),
        ("4000-4096", "s1", "outside"),
        ("0-15", "nope", "no shard named 'nope'"),
        ("0-15", "s0", "already owns"),
    ],
)
async def test_bad_move_requests_change_nothing(
    make_db: Any, slots: str, to: str, problem: str
) -> None:
    from tenfold.errors import MoveRefused

    db = await make_db(shards=2, migrations_dir=str(ARENA))
    before = await _state(db)
    with pytest.raises(MoveRefused, match=problem):
        await Mover(db).start(slots, to)
    assert await _state(db) == before


async def test_second_move_of_held_slots_is_refused(make_db: Any) -> None:
    from tenfold.errors import MoveConflict

    db = await make_db(shards=3, migrations_dir=str(ARENA))
    mover = Mover(db)
    [first] = await mover.start("0-99", "s1")
    before = await _state(db)
    with pytest.raises(MoveConflict, match=f"50-99 by {first.id}"):
        await mover.start("50-120", "s2")
    assert await _state(db) == before
    # Disjoint slots are fine, and the first move can still run.
    [other] = await mover.start("100-120", "s2")
    done = await mover.run(first.id)
    assert done.state == "switched"
    assert (await mover.run(other.id)).state == "switched"


async def test_verify_mismatch_stops_before_the_switch_and_names_the_key(make_db: Any) -> None:
    from tenfold.errors import VerifyFailed

    db = await make_db(shards=2, migrations_dir=str(ARENA))
    await _seed(db, 100)

    class Tampering(Mover):
        async def _catch_up(self, move: Any) -> None:
            await super()._catch_up(move)
            # A row on the target that no source change explains: corruption.
            async with db.shard("s1") as conn, conn.transaction():
                await conn.execute("UPDATE tenfold_slot_state SET state = 'apply'")
                await conn.execute(
                    "UPDATE arena_wallets SET balance = 7 WHERE user_id = "
                    "(SELECT min(user_id) FROM arena_wallets WHERE slot < 256)"
                )
                await conn.execute(
                    "UPDATE tenfold_slot_state SET state = 'fenced' WHERE state = 'apply'"
                )

    mover = Tampering(db, MoveOptions(batch_rows=30, duty=1.0))
    [move] = await mover.start("0-255", "s1")
    async with db.shard("s1") as conn:
        victim = await conn.fetchval("SELECT 1")  # s1 reachable
    assert victim == 1
    with pytest.raises(VerifyFailed, match=r"slot \d+ arena_wallets key \[\d+\]") as info:
        await mover.run(move.id)
    assert len(info.value.mismatches) == 1
    stored = await mover.store.get(move.id)
    assert stored.state == "verifying" and "VerifyFailed" in (stored.error or "")
    assert all(db.topology.shard_of_slot(s) == "s0" for s in range(256))
    # The source still takes writes to those slots (never fenced), and cancel cleans up.
    await _seed_one(db, next(f"v{i}" for i in range(9999) if slot_of(f"v{i}") < 256))
    cancelled = await Mover(db).cancel(move.id)
    assert cancelled.state == "cancelled"
    async with db.shard("s1") as conn:
        assert await conn.fetchval("SELECT count(*) FROM arena_wallets WHERE slot < 256") == 0


async def _seed_one(db: ShardedDatabase, name: str) -> None:
    uid = db.new_id(name)
    async with db.shard_for(name) as conn, conn.transaction():
        await conn.insert(
            "arena_users", {"id": uid, "username": name, "password_hash": "x", "created_at": 1.0}
        )


async def test_unpublished_events_and_inbox_rows_move_with_the_slot(make_db: Any) -> None:
    from tenfold.data.base import Insert

    db = await make_db(shards=2, migrations_dir=str(ARENA))
    name = next(f"e{i}" for i in range(9999) if slot_of(f"e{i}") < 256)
    slot = slot_of(name)
    async with db.shard_for(name) as conn:
        await conn.insert_together(
            [
                Insert(
                    "tenfold_outbox",
                    {
                        "event_id": "ev-moving",
                        "topic": "t",
                        "event_key": name,
                        "payload": b"{}",
                        "headers": None,
                        "created_at": 1.0,
                    },
                ),
                Insert(
                    "tenfold_inbox",
                    {"consumer_group": "g", "event_id": "ev-seen", "processed_at": 1.0},
                ),
            ]
        )
    [move] = await Mover(db, MoveOptions(duty=1.0)).move([slot], "s1")
    assert move.progress["carried_events"] == 1
    async with db.shard("s0") as conn:
        left = await conn.fetchrow(
            "SELECT published_at FROM tenfold_outbox WHERE event_id = 'ev-moving'"
        )
    assert left is not None and left[0] is not None  # marked: the old relay skips it
    async with db.shard("s1") as conn:
        carried = await conn.fetchrow(
            "SELECT slot, published_at FROM tenfold_outbox WHERE event_id = 'ev-moving'"
        )
        inbox = await conn.fetchval(
            "SELECT count(*) FROM tenfold_inbox WHERE consumer_group = 'g' AND event_id = 'ev-seen'"
        )
    assert carried is not None and carried[0] == slot and carried[1] is None
    assert inbox == 1


async def test_other_processes_learn_the_move_and_hear_which_slots_moved(
    make_db: Any, make_settings: Any
) -> None:
    db = await make_db(shards=2, migrations_dir=str(ARENA))
    other = ShardedDatabase(db.settings)
    await other.open(ids=False)
    heard: list[list[int]] = []
    other.on_slots_moved(heard.append)
    try:
        await Mover(db, MoveOptions(duty=1.0)).move("10-19", "s1")
        assert await other.refresh_topology()
        assert heard == [list(range(10, 20))]
        assert other.topology.shard_of_slot(15) == "s1"
    finally:
        await other.close()


async def test_added_shard_receives_slots_and_other_processes_open_it(
    make_db: Any, request: pytest.FixtureRequest
) -> None:
    from tests import services

    db = await make_db(shards=2, migrations_dir=str(ARENA))
    await _seed(db, 120)
    before = await _dump(db)
    dropped: list[str] = []
    if db.pool("s0").dialect == "sqlite":
        url = db.pool("s0").url.replace("shard0", "shard9")
    else:
        admin = request.getfixturevalue("pg_admin_url")
        name = services.unique_name("tfadd")
        dropped.append(name)
        url = services.database_url(admin, name)  # add_shard creates it
    try:
        topology = await db.add_shard("s9", url)
        assert "s9" in topology.shards and topology.slot_count("s9") == 0
        await Mover(db, MoveOptions(duty=1.0, complete_after_s=0)).move(
            "0-1023", "s9", until="completed"
        )
        other = ShardedDatabase(db.settings)  # its settings do not name s9
        await other.open(ids=False)
        try:
            assert other.topology.slot_count("s9") == 1024
            assert await _dump(other) == before  # every row kept its id
            # Ids made after the move, by two processes, land on the new owner and
            # never collide: the id space is per slot and per leased worker, not per shard.
            await other.close()
            await other.open()
            name = next(f"n{i}" for i in range(9999) if slot_of(f"n{i}") < 1024)
            fresh = {db.new_id(name) for _ in range(50)} | {other.new_id(name) for _ in range(50)}
            old_ids = {r[1] for r in before["arena_users"]}
            assert len(fresh) == 100 and not fresh & old_ids
            assert {other.topology.shard_of_slot(slot_of_id(i)) for i in fresh} == {"s9"}
        finally:
            await other.close()
    finally:
        if dropped:
            await db.pool("s9").close()
            await services.drop_databases(request.getfixturevalue("pg_admin_url"), dropped)


async def test_running_bus_relays_events_of_slots_moved_to_an_added_shard(
    make_db: Any, request: pytest.FixtureRequest
) -> None:
    """A process started before the shard existed still publishes what is written there."""
    from tenfold.data.base import Connection
    from tenfold.events.base import Delivery
    from tenfold.events.bus import EventBus
    from tenfold.events.memory import MemoryStreams
    from tests import services
    from tests.integration.support import wait_until

    db = await make_db(shards=2, migrations_dir=str(ARENA))
    streams = MemoryStreams(handler_timeout_s=10.0)
    bus = EventBus(db, streams)
    spec = bus.topic("shop.orders", partitions=4)
    seen: list[str] = []

    @bus.consumer("shop.orders", group="audit")
    async def audit(delivery: Delivery) -> None:
        seen.append(delivery.event.key)

    names = [f"k{i}" for i in range(20_000) if slot_of(f"k{i}") < 64][:6]
    await bus.start()
    dropped: list[str] = []
    if db.pool("s0").dialect == "sqlite":
        url = db.pool("s0").url.replace("shard0", "shard7")
    else:
        dropped.append(services.unique_name("tfbus"))
        url = services.database_url(request.getfixturevalue("pg_admin_url"), dropped[0])
    await db.add_shard("s7", url)
    await Mover(db, MoveOptions(duty=1.0)).move("0-63", "s7")
    try:
        for name in names:

            async def write(conn: Connection, name: str = name) -> None:
                await bus_emit(conn, spec, name)

            await db.transaction_for(name, write)
        await wait_until(lambda: sorted(seen) == sorted(names), what="every event once")
        assert "s7" in [r.shard for r in bus.relays]
        await asyncio.sleep(0.3)
        assert sorted(seen) == sorted(names)  # and no second delivery
    finally:
        await bus.stop(drain_timeout_s=1.0)
        if dropped:
            await db.pool("s7").close()
            await services.drop_databases(request.getfixturevalue("pg_admin_url"), dropped)


async def bus_emit(conn: Any, spec: Any, key: str) -> None:
    from tenfold.events.outbox import emit

    await emit(conn, spec, key, {"k": key})


async def test_schema_drift_and_finished_moves_are_refused_with_nothing_changed(
    make_db: Any,
) -> None:
    from tenfold.errors import MoveRefused

    db = await make_db(shards=2, migrations_dir=str(ARENA))
    async with db.shard("s0") as conn:
        await conn.execute("CREATE TABLE drift (slot INTEGER NOT NULL, id BIGINT PRIMARY KEY)")
    before = await _state(db)
    with pytest.raises(MoveRefused, match="table drift differs between s0 and s1"):
        await Mover(db).start("0-10", "s1")
    assert await _state(db) == before
    async with db.shard("s0") as conn:
        await conn.execute("DROP TABLE drift")
    mover = Mover(db, MoveOptions(duty=1.0, complete_after_s=0))
    [move] = await mover.move("0-10", "s1", until="completed")
    with pytest.raises(MoveRefused, match="only a switched move can be reversed"):
        await mover.reverse(move.id)
    with pytest.raises(MoveRefused, match="is completed: it finished; nothing to cancel"):
        await mover.cancel(move.id)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_added_shard_without_the_apps_migrations_is_refused_and_not_registered(
    make_db: Any,
) -> None:
    from tenfold.errors import MoveRefused

    db = await make_db(shards=2, migrations_dir=str(ARENA))
    url = db.pool("s0").url.replace("shard0", "shard8")
    # An operator's CLI that does not know the app: no migrations folder.
    bare = ShardedDatabase(db.settings.model_copy(update={"migrations_dir": None}))
    await bare.open(ids=False)
    try:
        epoch = await bare.catalog.current_epoch()
        with pytest.raises(MoveRefused, match=r"shard s8 lacks migration.*app/0001_arena"):
            await bare.add_shard("s8", url)
        assert await bare.catalog.current_epoch() == epoch
        assert "s8" not in bare.shard_names and await bare.catalog.added_shards() == {}
        topology = await bare.add_shard("s8", url, ARENA)
        assert "s8" in topology.shards
    finally:
        await bare.close()
