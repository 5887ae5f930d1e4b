"""Scatter-gather over real shards: exact global ordering, subsets, per-shard timeouts."""

from __future__ import annotations

import time

import pytest

from tenfold.errors import KeyspaceError, ScatterError, ShardTimeout

N = 200


def _row(i: int) -> dict[str, object]:
    # 7919 is coprime with 1000, so scores are distinct; grp has many ties.
    return {"k": f"user-{i:03d}", "score": (i * 7919) % 1000, "grp": i % 5}


ROWS = [_row(i) for i in range(N)]


async def _spread(make_db):
    db = await make_db(shards=4)
    for name in db.shard_names:
        async with db.shard(name) as conn:
            await conn.execute(
                "CREATE TABLE scores (slot INT NOT NULL, k TEXT PRIMARY KEY, score INT, grp INT)"
            )
    for row in ROWS:
        async with db.shard_for(row["k"]) as conn:
            await conn.insert("scores", row)
    owners = {row["k"]: db.shard_name_for(row["k"]) for row in ROWS}
    assert set(owners.values()) == set(db.shard_names)  # really spread
    return db, owners


def _as_tuples(rows):
    return [(r["k"], r["score"], r["grp"]) for r in rows]


def _expected(rows, key, *, reverse=False, limit=None):
    out = [(r["k"], r["score"], r["grp"]) for r in sorted(rows, key=key, reverse=reverse)]
    return out if limit is None else out[:limit]


async def test_top_k_by_a_column_is_exact(make_db):
    db, owners = await _spread(make_db)
    sql = "SELECT k, score, grp FROM scores ORDER BY score DESC LIMIT 10"
    result = await db.scatter(sql, order_by="score", descending=True, limit=10)
    assert result.complete
    assert _as_tuples(result.rows) == _expected(ROWS, lambda r: r["score"], reverse=True, limit=10)

    # Shards that send unsorted, unlimited rows merge to the same answer.
    everything = await db.scatter("SELECT k, score, grp FROM scores", order_by="score", limit=7)
    assert _as_tuples(everything.rows) == _expected(ROWS, lambda r: r["score"], limit=7)
    full = await db.scatter("SELECT k, score, grp FROM scores", order_by="score", descending=True)
    assert _as_tuples(full.rows) == _expected(ROWS, lambda r: r["score"], reverse=True)

    # Per-shard results are each shard's own rows.
    assert set(everything.by_shard) == set(db.shard_names)
    for name, rows in everything.by_shard.items():
        assert sorted(r["k"] for r in rows) == sorted(k for k, o in owners.items() if o == name)


async def test_order_by_several_columns_and_a_key_function(make_db):
    db, _ = await _spread(make_db)
    sql = "SELECT k, score, grp FROM scores"
    by_columns = await db.scatter(sql, order_by=["grp", "k"], limit=15)
    assert _as_tuples(by_columns.rows) == _expected(ROWS, lambda r: (r["grp"], r["k"]), limit=15)

    desc = await db.scatter(sql, order_by=("grp", "score"), descending=True, limit=12)
    assert _as_tuples(desc.rows) == _expected(
        ROWS, lambda r: (r["grp"], r["score"]), reverse=True, limit=12
    )

    by_key = await db.scatter(sql, order_by=lambda r: (r["score"] % 10, r["k"]))
    assert _as_tuples(by_key.rows) == _expected(ROWS, lambda r: (r["score"] % 10, r["k"]))

    # No order: every row exactly once.
    plain = await db.scatter(sql)
    assert sorted(_as_tuples(plain.rows)) == sorted(_expected(ROWS, lambda r: r["k"]))


async def test_scatter_passes_arguments(make_db):
    db, _ = await _spread(make_db)
    result = await db.scatter(
        "SELECT k, score, grp FROM scores WHERE grp = $1 AND score < $2", 3, 500, order_by="k"
    )
    expected = [r for r in ROWS if r["grp"] == 3 and r["score"] < 500]
    assert expected
    assert _as_tuples(result.rows) == _expected(expected, lambda r: r["k"])


async def test_shard_subset(make_db):
    db, owners = await _spread(make_db)
    result = await db.scatter("SELECT k, score, grp FROM scores", shards=["s1", "s3"], order_by="k")
    assert set(result.by_shard) == {"s1", "s3"}
    expected = [r for r in ROWS if owners[r["k"]] in ("s1", "s3")]
    assert _as_tuples(result.rows) == _expected(expected, lambda r: r["k"])

    with pytest.raises(KeyspaceError, match="nope"):
        await db.scatter("SELECT 1", shards=["s0", "nope"])


def _slow_sql(backend: str) -> str:
    # Each shard waits for as long as its own `delay` row says: only one is slow.
    if backend == "postgres":
        return "SELECT d.n AS n, pg_sleep(d.n) IS NULL AS slept FROM delay d"
    return (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
        "WHERE x < (SELECT n FROM delay)) SELECT MAX(x) AS n FROM c"
    )


@pytest.mark.timeout(60)
async def test_a_slow_shard_times_out_alone(make_db, backend):
    db = await make_db(shards=4)
    slow = 5 if backend == "postgres" else 60_000_000  # ~10 s of counting
    for name in db.shard_names:
        async with db.shard(name) as conn:
            await conn.execute("CREATE TABLE delay (n BIGINT)")
            await conn.execute("INSERT INTO delay (n) VALUES ($1)", slow if name == "s2" else 0)

    start = time.monotonic()
    result = await db.scatter(_slow_sql(backend), timeout_s=0.5, partial=True)
    assert time.monotonic() - start < 2.5
    assert set(result.failed) == {"s2"}
    assert isinstance(result.failed["s2"], ShardTimeout)
    assert "s2" in str(result.failed["s2"])
    assert set(result.by_shard) == {"s0", "s1", "s3"}
    assert len(result.rows) == 3

    with pytest.raises(ScatterError, match="s2"):
        await db.scatter(_slow_sql(backend), timeout_s=0.5)

    # The slow shard's connection was not left running the query.
    start = time.monotonic()
    async with db.shard("s2") as conn:
        assert await conn.fetchval("SELECT 1", timeout=5) == 1
    assert time.monotonic() - start < 2.0
