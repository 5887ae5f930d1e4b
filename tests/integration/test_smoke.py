from tenfold import slot_of


async def test_roundtrip(make_db):
    db = await make_db(shards=4)
    async with db.shard_for("alice") as conn:
        await conn.execute("CREATE TABLE t (slot INT NOT NULL, name TEXT)")
        await conn.insert("t", {"name": "alice"})
        slot = await conn.fetchval("SELECT slot FROM t WHERE name = $1", "alice")
        assert slot == slot_of("alice")
