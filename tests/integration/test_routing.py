"""Keys reach the shard that owns their slot; `insert` stamps the slot and refuses injection."""

from __future__ import annotations

import pytest

from tenfold import slot_of
from tenfold.errors import QueryError
from tenfold.ids import slot_of_id

KEYS = [f"user-{i}" for i in range(200)]


async def _create_everywhere(db, ddl: str) -> None:
    for name in db.shard_names:
        async with db.shard(name) as conn:
            await conn.execute(ddl)


async def test_shard_for_lands_on_the_owner_and_tags_the_connection(make_db):
    db = await make_db(shards=4)
    for key in ["alice", "bob", 42, b"raw"]:
        expected = db.topology.shard_of(key)
        assert db.shard_name_for(key) == expected
        async with db.shard_for(key) as conn:
            assert conn.shard == expected
            assert conn.slot == slot_of(key)
    async with db.shard("s2") as conn:
        assert conn.shard == "s2"
        assert conn.slot is None


async def test_rows_live_only_on_their_owning_shard(make_db):
    db = await make_db(shards=4)
    await _create_everywhere(db, "CREATE TABLE items (slot INT NOT NULL, k TEXT PRIMARY KEY)")
    for key in KEYS:
        async with db.shard_for(key) as conn:
            assert await conn.insert("items", {"k": key}) == 1

    seen: dict[str, str] = {}
    for name in db.shard_names:
        async with db.shard(name) as conn:
            for row in await conn.fetch("SELECT k, slot FROM items"):
                assert row["k"] not in seen, f"{row['k']} stored on {seen.get(row['k'])} and {name}"
                seen[row["k"]] = name
                assert row["slot"] == slot_of(row["k"])
    assert seen == {key: db.shard_name_for(key) for key in KEYS}
    # With 200 keys over 4 balanced shards, every shard holds some.
    assert set(seen.values()) == set(db.shard_names)


async def test_shard_for_id_reaches_the_keys_shard(make_db):
    db = await make_db(shards=4)
    for key in KEYS[:50]:
        id_ = db.new_id(key)
        async with db.shard_for_id(id_) as by_id, db.shard_for(key) as by_key:
            assert by_id.shard == by_key.shard == db.shard_name_for(key)
            assert by_id.slot == slot_of(key)


async def test_new_id_beside_shares_its_parents_slot_and_shard(make_db):
    db = await make_db(shards=4)
    moved = 0
    for key in KEYS[:50]:
        parent = db.new_id(key)
        child = db.new_id_beside(parent)
        assert child != parent and slot_of_id(child) == slot_of_id(parent) == slot_of(key)
        async with db.shard_for_id(child) as a, db.shard_for_id(parent) as b:
            assert a.shard == b.shard
        moved += slot_of_id(db.new_id(parent)) != slot_of_id(parent)  # hashing the number
    assert moved > 40  # what new_id(parent) would have done instead


async def test_insert_without_a_slot_is_refused(make_db):
    db = await make_db(shards=2)
    await _create_everywhere(db, "CREATE TABLE items (slot INT NOT NULL, k TEXT)")
    async with db.shard("s0") as conn:
        with pytest.raises(QueryError, match="shard_for"):
            await conn.insert("items", {"k": "x"})
        with pytest.raises(QueryError):
            await conn.insert_many("items", [{"k": "x"}])
        assert await conn.fetchval("SELECT COUNT(*) FROM items") == 0


async def test_insert_returning_and_insert_many(make_db, backend):
    db = await make_db(shards=2)
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT" if backend == "sqlite" else "SERIAL PRIMARY KEY"
    await _create_everywhere(
        db, f"CREATE TABLE notes (id {serial}, slot INT NOT NULL, k TEXT, body TEXT)"
    )
    async with db.shard_for("carol") as conn:
        first = await conn.insert("notes", {"k": "carol", "body": "a"}, returning="id")
        second = await conn.insert("notes", {"k": "carol", "body": "b"}, returning="id")
        assert isinstance(first, int)
        assert second > first
        await conn.insert_many("notes", [{"k": "carol", "body": f"m{i}"} for i in range(5)])
        await conn.insert_many("notes", [])
        rows = await conn.fetch("SELECT slot, body FROM notes ORDER BY id")
    assert [r["body"] for r in rows] == ["a", "b", "m0", "m1", "m2", "m3", "m4"]
    assert {r["slot"] for r in rows} == {slot_of("carol")}


BAD_NAMES = [
    ("t; DROP TABLE victim", {"k": "x"}, None),
    ("t", {"k; DROP TABLE victim --": "x"}, None),
    ("t", {'k") VALUES (1); DROP TABLE victim; --': "x"}, None),
    ("t", {"k": "x"}, "k; DROP TABLE victim"),
    ("1t", {"k": "x"}, None),
    ("t", {"": "x"}, None),
]


async def test_non_identifier_names_are_refused(make_db):
    db = await make_db(shards=1)
    await _create_everywhere(db, "CREATE TABLE t (slot INT NOT NULL, k TEXT)")
    await _create_everywhere(db, "CREATE TABLE victim (x INT)")
    async with db.shard_for("k") as conn:
        for table, row, returning in BAD_NAMES:
            with pytest.raises(QueryError, match="not a plain SQL identifier"):
                await conn.insert(table, row, returning=returning)
            if returning is None:
                with pytest.raises(QueryError, match="not a plain SQL identifier"):
                    await conn.insert_many(table, [row])
        # Nothing ran: the victim table is still there and t is empty.
        assert await conn.fetchval("SELECT COUNT(*) FROM victim") == 0
        assert await conn.fetchval("SELECT COUNT(*) FROM t") == 0
        # A plain name still works on the same connection.
        assert await conn.insert("t", {"k": "ok"}) == 1
