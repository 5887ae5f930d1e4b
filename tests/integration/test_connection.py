"""One connection contract on every backend: placeholders, records, transactions, errors, bounds."""

from __future__ import annotations

import asyncio
import time

import pytest

from tenfold.errors import (
    ConstraintViolation,
    InvalidValue,
    QueryError,
    ShardTimeout,
    ShardUnavailable,
)

TABLE = "CREATE TABLE kv (slot INT NOT NULL, k TEXT PRIMARY KEY, v INT NOT NULL)"


async def _db_with_table(make_db, **overrides):
    db = await make_db(shards=1, **overrides)
    async with db.shard("s0") as conn:
        await conn.execute(TABLE)
    return db


async def _count(db) -> int:
    async with db.shard("s0") as conn:
        return int(await conn.fetchval("SELECT COUNT(*) FROM kv"))


async def test_dollar_placeholders_on_every_call(make_db):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        inserted = await conn.execute(
            "INSERT INTO kv (slot, k, v) VALUES ($1, $2, $3), ($1, $4, $5)", 0, "a", 1, "b", 2
        )
        assert inserted == 2
        await conn.executemany(
            "INSERT INTO kv (slot, k, v) VALUES (0, $1, $2)", [("c", 3), ("d", 4), ("e", 5)]
        )
        # Placeholders out of order and repeated.
        rows = await conn.fetch("SELECT k FROM kv WHERE v > $2 AND v < $1 ORDER BY k", 5, 1)
        assert [r["k"] for r in rows] == ["b", "c", "d"]
        row = await conn.fetchrow("SELECT k, v FROM kv WHERE k = $1", "d")
        assert (row["k"], row["v"]) == ("d", 4)
        assert await conn.fetchval("SELECT v FROM kv WHERE k = $1", "e") == 5
        assert await conn.fetchval("SELECT k, v FROM kv WHERE k = $1", "e", column=1) == 5
        assert await conn.execute("UPDATE kv SET v = v + $1 WHERE v >= $2", 10, 3) == 3
        assert await conn.execute("UPDATE kv SET v = 0 WHERE k = $1", "zzz") == 0
        assert await conn.execute("DELETE FROM kv WHERE k = $1", "a") == 1
        assert await conn.execute("CREATE TABLE other (x INT)") == 0
        vs = [r["v"] for r in await conn.fetch("SELECT v FROM kv ORDER BY k")]
        assert vs == [2, 13, 14, 15]


async def test_dollar_inside_literals_is_left_alone(make_db):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, '$1', 7)")
        await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, $1, 8)", "x")
        row = await conn.fetchrow(
            "SELECT '$1' AS lit, 'it''s $2' AS quoted, v FROM kv WHERE k = $1 -- $2 here\n", "$1"
        )
    assert row["lit"] == "$1"
    assert row["quoted"] == "it's $2"
    assert row["v"] == 7


async def test_records_index_by_name_position_and_dict(make_db):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'a', 1)")
        (row,) = await conn.fetch("SELECT k, v FROM kv")
        assert row["k"] == row[0] == "a"
        assert row["v"] == row[1] == 1
        assert dict(row) == {"k": "a", "v": 1}
        assert await conn.fetchrow("SELECT k FROM kv WHERE k = $1", "none") is None
        assert await conn.fetchval("SELECT k FROM kv WHERE k = $1", "none") is None
        assert await conn.fetch("SELECT k FROM kv WHERE k = $1", "none") == []


async def test_transaction_commits_or_rolls_back(make_db):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'kept', 1)")
        with pytest.raises(RuntimeError, match="boom"):
            async with conn.transaction():
                await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'lost1', 1)")
                await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'lost2', 1)")
                raise RuntimeError("boom")
    # Seen from another connection: only the committed row exists.
    async with db.shard("s0") as conn:
        assert [r["k"] for r in await conn.fetch("SELECT k FROM kv")] == ["kept"]


async def test_nested_transaction_is_a_savepoint(make_db):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn, conn.transaction():
        await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'outer', 1)")
        with pytest.raises(ValueError):
            async with conn.transaction():
                await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'inner', 1)")
                raise ValueError
        async with conn.transaction():
            await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'inner_ok', 1)")
    async with db.shard("s0") as conn:
        rows = await conn.fetch("SELECT k FROM kv ORDER BY k")
    assert [r["k"] for r in rows] == ["inner_ok", "outer"]


async def test_outer_rollback_discards_released_savepoints(make_db):
    db = await _db_with_table(make_db)
    with pytest.raises(KeyError):
        async with db.shard("s0") as conn, conn.transaction():
            async with conn.transaction():
                await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'inner', 1)")
            raise KeyError
    assert await _count(db) == 0


async def test_executemany_is_all_or_nothing(make_db):
    db = await _db_with_table(make_db)
    rows = [("a", 1), ("b", 2), ("a", 3), ("c", 4)]  # the third repeats a primary key
    async with db.shard("s0") as conn:
        with pytest.raises(ConstraintViolation):
            await conn.executemany("INSERT INTO kv (slot, k, v) VALUES (0, $1, $2)", rows)
        assert await conn.fetchval("SELECT COUNT(*) FROM kv") == 0
        # The connection is fine afterwards.
        await conn.executemany("INSERT INTO kv (slot, k, v) VALUES (0, $1, $2)", rows[:2])
    assert await _count(db) == 2


async def test_constraint_and_syntax_errors_name_the_shard(make_db):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'a', 1)")
        with pytest.raises(ConstraintViolation, match="s0") as exc_info:
            await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'a', 2)")
        assert isinstance(exc_info.value, QueryError)
        assert exc_info.value.shard == "s0"
        with pytest.raises(ConstraintViolation):
            await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'b', NULL)")

        with pytest.raises(QueryError, match="s0") as exc_info:
            await conn.fetch("SELEC k FROM kv")
        assert not isinstance(exc_info.value, ConstraintViolation)
        assert exc_info.value.shard == "s0"
        assert "SELEC k FROM kv" in str(exc_info.value)
        with pytest.raises(QueryError, match="s0"):
            await conn.fetch("SELECT nope FROM kv")
        # Still usable.
        assert await conn.fetchval("SELECT v FROM kv WHERE k = 'a'") == 1


def _slow_query(backend: str) -> str:
    if backend == "postgres":
        return "SELECT pg_sleep(5)"
    # Counts to a billion: many seconds of pure CPU in SQLite.
    return (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
        "SELECT COUNT(*) FROM c"
    )


@pytest.mark.timeout(30)
async def test_query_timeout_raises_and_connection_survives(make_db, backend):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        start = time.monotonic()
        with pytest.raises(ShardTimeout, match="s0") as exc_info:
            await conn.fetchval(_slow_query(backend), timeout=0.3)
        assert time.monotonic() - start < 2.5
        assert exc_info.value.shard == "s0"
        assert exc_info.value.timeout_s == pytest.approx(0.3)
        assert await conn.fetchval("SELECT 41 + 1") == 42
        await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'after', 1)")
    assert await _count(db) == 1


@pytest.mark.timeout(30)
async def test_default_query_timeout_applies(make_db, backend):
    db = await _db_with_table(make_db, query_timeout_s=0.3)
    start = time.monotonic()
    async with db.shard("s0") as conn:
        with pytest.raises(ShardTimeout):
            await conn.fetchval(_slow_query(backend))
        assert await conn.fetchval("SELECT 1") == 1
    assert time.monotonic() - start < 2.5


@pytest.mark.timeout(30)
async def test_pool_is_bounded(make_db):
    db = await _db_with_table(make_db, pool_min_size=1, pool_max_size=2, pool_acquire_timeout_s=0.3)
    async with db.shard("s0") as first, db.shard("s0") as second:
        assert await first.fetchval("SELECT 1") == 1
        assert await second.fetchval("SELECT 2") == 2
        start = time.monotonic()
        with pytest.raises(ShardTimeout, match="s0"):
            async with db.shard("s0"):
                pass
        assert 0.25 <= time.monotonic() - start < 2.0
        stats = db.pool("s0").stats()
        assert stats.in_use == 2
        assert stats.max_size == 2
    # Once one is returned, the next acquire succeeds.
    async with db.shard("s0") as conn:
        assert await conn.fetchval("SELECT 3") == 3
    assert db.pool("s0").stats().in_use == 0


@pytest.mark.timeout(30)
async def test_waiter_gets_a_released_connection(make_db):
    db = await _db_with_table(make_db, pool_min_size=1, pool_max_size=1, pool_acquire_timeout_s=2)
    holding = asyncio.Event()

    async def holder():
        async with db.shard("s0") as conn:
            await conn.fetchval("SELECT 1")
            holding.set()
            await asyncio.sleep(0.3)

    async def waiter():
        await holding.wait()
        start = time.monotonic()
        async with db.shard("s0") as conn:
            waited = time.monotonic() - start
            return waited, await conn.fetchval("SELECT 7")

    _, (waited, value) = await asyncio.gather(holder(), waiter())
    assert value == 7
    assert waited >= 0.2


async def test_unbindable_argument_is_a_query_error(make_db):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        with pytest.raises(QueryError, match="s0") as exc_info:
            await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'a', $1)", ["not", "int"])
        assert not isinstance(exc_info.value, ConstraintViolation)
        assert await conn.fetchval("SELECT COUNT(*) FROM kv") == 0


def _slow_insert(backend: str) -> str:
    if backend == "postgres":
        return "INSERT INTO kv (slot, k, v) SELECT 0, $1, 1 FROM pg_sleep($2)"
    return (
        "INSERT INTO kv (slot, k, v) SELECT 0, $1, MAX(x) FROM ("
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $2) "
        "SELECT x FROM c)"
    )


@pytest.mark.timeout(60)
async def test_executemany_timeout_is_bounded_and_rolls_back(make_db, backend):
    db = await _db_with_table(make_db)
    slow = 5 if backend == "postgres" else 60_000_000  # seconds of work either way
    async with db.shard("s0") as conn:
        start = time.monotonic()
        with pytest.raises(ShardTimeout, match="s0"):
            await conn.executemany(_slow_insert(backend), [("a", 0), ("b", slow)], timeout=0.3)
        assert time.monotonic() - start < 2.5
        assert await conn.fetchval("SELECT COUNT(*) FROM kv", timeout=5) == 0
        await conn.executemany(_slow_insert(backend), [("c", 0)])
    assert await _count(db) == 1


@pytest.mark.timeout(60)
async def test_timeout_inside_a_transaction_rolls_it_back(make_db, backend):
    db = await _db_with_table(make_db)
    slow = 5 if backend == "postgres" else 60_000_000
    async with db.shard("s0") as conn:
        start = time.monotonic()
        with pytest.raises(ShardTimeout, match="s0"):
            async with conn.transaction():
                await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'first', 1)")
                await conn.execute(_slow_insert(backend), "second", slow, timeout=0.3)
        assert time.monotonic() - start < 2.5
        assert await conn.fetchval("SELECT COUNT(*) FROM kv", timeout=5) == 0
        async with conn.transaction():
            await conn.execute("INSERT INTO kv (slot, k, v) VALUES (0, 'third', 1)")
    assert await _count(db) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("reset", ["transaction", "session"])
async def test_release_rolls_back_and_resets_what_pool_reset_says(make_db, reset):
    db = await make_db(shards=1, pool_min_size=1, pool_max_size=1, pool_reset=reset)
    async with db.shard("s0") as conn:
        await conn.execute("SET application_name = 'left-behind'")
    async with db.shard("s0") as conn:  # the same, only connection
        name = await conn.fetchval("SHOW application_name")
        # An open transaction never survives a release, whatever the mode.
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE pending (x INT)")
    async with db.shard("s0") as conn:
        assert await conn.fetchval("SELECT current_setting('transaction_isolation')")
        assert not await conn.fetchval("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('pending') IS NULL")
    # "transaction" leaves session state as PgBouncer's transaction mode does;
    # "session" resets it with asyncpg's full reset query.
    assert name == ("left-behind" if reset == "transaction" else "")


async def test_insert_together_is_all_or_nothing(make_db):
    from tenfold.data.base import Insert

    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        await conn.execute("CREATE TABLE log (note TEXT PRIMARY KEY)")
    async with db.shard_for("a") as conn:
        assert not conn.in_transaction
        await conn.insert_together(
            [Insert("kv", {"k": "a", "v": 1}), Insert("log", {"note": "a"}, sharded=False)]
        )
        with pytest.raises(ConstraintViolation):  # the second row clashes: neither is kept
            await conn.insert_together(
                [Insert("kv", {"k": "b", "v": 2}), Insert("log", {"note": "a"}, sharded=False)]
            )
        assert not conn.in_transaction
        async with conn.transaction():  # inside a transaction it joins it
            await conn.insert_together(
                [Insert("kv", {"k": "c", "v": 3}), Insert("log", {"note": "c"}, sharded=False)]
            )
            assert conn.in_transaction
        rows = await conn.fetch("SELECT k, slot FROM kv ORDER BY k")
        notes = [r["note"] for r in await conn.fetch("SELECT note FROM log ORDER BY note")]
    assert [r["k"] for r in rows] == ["a", "c"] and notes == ["a", "c"]
    assert all(r["slot"] == conn.slot for r in rows)  # sharded rows get the key's slot


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.timeout(30)
async def test_release_in_place_returns_connections_even_when_cancelled(make_db, monkeypatch):
    import asyncpg

    async def shielded(*args, **kwargs):
        raise AssertionError("released through asyncpg's shielded Pool.release")

    monkeypatch.setattr(asyncpg.pool.Pool, "release", shielded)
    db = await make_db(shards=1, pool_min_size=1, pool_max_size=1, pool_acquire_timeout_s=2)
    for _ in range(3):  # the one connection goes back each time, without the shield
        async with db.shard("s0") as conn:
            assert await conn.fetchval("SELECT 1") == 1
    inside = asyncio.Event()

    async def stuck() -> None:
        async with db.shard("s0") as conn, conn.transaction():
            inside.set()
            await conn.execute("SELECT pg_sleep(10)")

    task = asyncio.create_task(stuck())
    await inside.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with db.shard("s0") as conn:  # the only connection, back and usable
        assert await conn.fetchval("SELECT 2") == 2
        assert not conn.in_transaction
    assert db.pool("s0").stats().in_use == 0


@pytest.mark.parametrize(
    "value",
    ["a\x00b", "\x00", "tail\x00"],
    ids=["middle", "alone", "end"],
)
async def test_nul_in_text_is_an_invalid_value_on_every_backend(make_db, value):
    """PostgreSQL cannot store U+0000 in text; SQLite could, so it refuses it too."""
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        sql = "INSERT INTO kv (slot, k, v) VALUES (0, $1, 1)"
        with pytest.raises(InvalidValue) as exc_info:
            await conn.execute(sql, value)
        err = exc_info.value
        assert err.shard == "s0" and err.http_status == 422
        assert "NUL" in err.reason and "0x00" not in err.reason  # our words, not the driver's
        with pytest.raises(InvalidValue):
            await conn.executemany(sql, [("fine",), (value,)])
        with pytest.raises(InvalidValue):
            await conn.fetchval("SELECT v FROM kv WHERE k = $1", value)
        assert await conn.fetchval("SELECT COUNT(*) FROM kv") == 0  # nothing was written


async def test_integer_out_of_range_is_an_invalid_value_on_every_backend(make_db):
    db = await _db_with_table(make_db)
    async with db.shard("s0") as conn:
        with pytest.raises(InvalidValue) as exc_info:
            await conn.fetchval("SELECT k FROM kv WHERE slot = $1", 2**63)
        assert "out of range" in exc_info.value.reason
        assert "9223372036854775808" not in exc_info.value.reason


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.timeout(30)
async def test_backend_killed_mid_query_is_shard_unavailable(make_db):
    """A terminated server process is a 503-worthy ShardUnavailable, never a raw driver error."""
    db = await _db_with_table(make_db)
    async with db.shard("s0") as side, db.shard("s0") as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        query = asyncio.create_task(conn.execute("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.2)
        await side.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(ShardUnavailable) as exc_info:
            await query
        assert exc_info.value.shard == "s0"
        with pytest.raises(ShardUnavailable):  # the dead connection, used again
            await conn.fetchval("SELECT 1")
    async with db.shard("s0") as conn:  # the pool replaced it
        assert await conn.fetchval("SELECT 1") == 1
