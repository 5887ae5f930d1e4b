"""App migrations: applied once everywhere, dialect variants, edits refused, failures atomic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tenfold import ShardedDatabase
from tenfold.data.schema import schema_status, slot_convention
from tenfold.errors import MigrationError

SHARD_APP = ["app/0001_create", "app/0002_index"]


def _write(folder: Path, rel: str, sql: str) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sql)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "migrations"
    _write(
        root,
        "shard/0001_create.sql",
        "-- the app's table; a ';' in a comment and a string is fine\n"
        "CREATE TABLE things (slot INT NOT NULL, k TEXT NOT NULL, note TEXT DEFAULT 'a;b');\n"
        "CREATE TABLE extras (slot INT NOT NULL, x INT);\n"
        "CREATE INDEX extras_slot ON extras (slot);\n",
    )
    # Only the dialect variants of 0002 may ever run.
    _write(root, "shard/0002_index.sql", "CREATE INDEX idx_generic ON things (slot);\n")
    _write(root, "shard/0002_index.sqlite.sql", "CREATE INDEX idx_sqlite ON things (slot, k);\n")
    _write(
        root,
        "shard/0002_index.postgresql.sql",
        "CREATE INDEX idx_postgresql ON things USING btree (slot, k);\n",
    )
    _write(root, "catalog/0001_x.sql", "CREATE TABLE app_settings (name TEXT PRIMARY KEY);\n")
    return root


def _app(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("app/")]


async def _indexes(db: ShardedDatabase, shard: str) -> set[str]:
    async with db.shard(shard) as conn:
        if db.pool(shard).dialect == "sqlite":
            rows = await conn.fetch("SELECT name FROM sqlite_master WHERE type = 'index'")
        else:
            rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'things'")
    return {r[0] for r in rows}


async def _recorded(pool) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT name FROM tenfold_migrations ORDER BY name")
    return [r[0] for r in rows]


async def test_migrate_applies_everywhere_once(make_db, folder, backend):
    db = await make_db(shards=3, migrate=False)
    applied = await db.migrate(folder)
    assert set(applied) == {"catalog", "s0", "s1", "s2"}
    assert _app(applied["catalog"]) == ["app/0001_x"]
    for name in db.shard_names:
        assert _app(applied[name]) == SHARD_APP
        dialect = "sqlite" if backend == "sqlite" else "postgresql"
        indexes = await _indexes(db, name)
        assert f"idx_{dialect}" in indexes
        assert "idx_generic" not in indexes
        async with db.shard(name) as conn:
            await conn.execute("INSERT INTO things (slot, k) VALUES (1, 'x')")
            assert await conn.fetchval("SELECT note FROM things") == "a;b"
    async with db.catalog.pool.acquire() as conn:
        assert await conn.fetchval("SELECT COUNT(*) FROM app_settings") == 0

    again = await db.migrate(folder)
    assert again == {"catalog": [], "s0": [], "s1": [], "s2": []}

    statuses = {s.database: s for s in await schema_status(db, folder)}
    assert set(statuses) == {"catalog", "s0", "s1", "s2"}
    for status in statuses.values():
        assert status.pending == []
        assert status.changed == []
        assert status.error is None
    for name in db.shard_names:
        assert statuses[name].applied == len(applied[name])
        assert statuses[name].convention == []
        assert _app(await _recorded(db.pool(name))) == SHARD_APP


async def test_status_shows_pending_before_migrate(make_db, folder):
    db = await make_db(shards=2)  # tenfold's own migrations only
    statuses = {s.database: s for s in await schema_status(db, folder)}
    assert statuses["catalog"].pending == ["app/0001_x"]
    assert statuses["s0"].pending == SHARD_APP
    await db.migrate(folder)
    assert all(not s.pending for s in await schema_status(db, folder))


async def test_editing_an_applied_migration_is_refused(make_db, folder):
    db = await make_db(shards=2, migrate=False)
    await db.migrate(folder)
    path = folder / "shard" / "0001_create.sql"
    path.write_text(path.read_text() + "CREATE TABLE sneaky (slot INT);\n")
    with pytest.raises(MigrationError) as exc_info:
        await db.migrate(folder)
    message = str(exc_info.value)
    assert "app/0001_create" in message
    assert exc_info.value.shard in ("s0", "s1")
    assert f"applied to {exc_info.value.shard}" in message
    for name in db.shard_names:
        async with db.shard(name) as conn:
            assert await conn.fetchval("SELECT COUNT(*) FROM things") == 0  # still there
    statuses = {s.database: s for s in await schema_status(db, folder)}
    assert statuses["s0"].changed == ["app/0001_create"]
    assert statuses["catalog"].changed == []

    catalog_file = folder / "catalog" / "0001_x.sql"
    catalog_file.write_text("CREATE TABLE app_settings (name TEXT);\n")
    path.write_text(path.read_text().replace("CREATE TABLE sneaky (slot INT);\n", ""))
    with pytest.raises(MigrationError, match=r"app/0001_x.*catalog"):
        await db.migrate(folder)


async def test_a_failing_migration_applies_nothing_of_itself(make_db, folder):
    db = await make_db(shards=2, migrate=False)
    _write(
        folder,
        "shard/0003_broken.sql",
        "CREATE TABLE half_done (slot INT NOT NULL);\n"
        "INSERT INTO half_done (slot) VALUES (1);\n"
        "CREATE TABLE oops (slot INT NOT NULL, THIS IS NOT SQL);\n",
    )
    with pytest.raises(MigrationError) as exc_info:
        await db.migrate(folder)
    message = str(exc_info.value)
    assert "app/0003_broken" in message
    assert exc_info.value.shard in db.shard_names
    assert f"on {exc_info.value.shard}" in message

    for name in db.shard_names:
        assert _app(await _recorded(db.pool(name))) == SHARD_APP
        async with db.shard(name) as conn:
            assert await conn.fetchval("SELECT COUNT(*) FROM things") == 0
            with pytest.raises(Exception, match="half_done"):
                await conn.fetchval("SELECT COUNT(*) FROM half_done")
    statuses = {s.database: s for s in await schema_status(db, folder)}
    assert statuses["s1"].pending == ["app/0003_broken"]

    # It was never recorded, so fixing the file is allowed and it applies.
    _write(folder, "shard/0003_broken.sql", "CREATE TABLE half_done (slot INT NOT NULL);\n")
    applied = await db.migrate(folder)
    assert all(applied[name] == ["app/0003_broken"] for name in db.shard_names)


@pytest.mark.timeout(60)
async def test_concurrent_migrators_apply_each_migration_once(make_settings, folder):
    settings = make_settings(shards=3)
    dbs = [ShardedDatabase(settings) for _ in range(3)]
    try:
        await asyncio.gather(*(db.open() for db in dbs))
        results = await asyncio.gather(*(db.migrate(folder) for db in dbs))
        for database in ["catalog", "s0", "s1", "s2"]:
            names = [n for result in results for n in result[database]]
            assert len(names) == len(set(names)), f"{database}: applied twice: {names}"
            pool = dbs[0].catalog.pool if database == "catalog" else dbs[0].pool(database)
            recorded = await _recorded(pool)
            assert sorted(names) == [n for n in recorded if n in names]
            expected = ["app/0001_x"] if database == "catalog" else SHARD_APP
            assert sorted(_app(names)) == expected
            assert _app(recorded) == expected
    finally:
        for db in dbs:
            await db.close()


async def test_slot_convention_names_the_tables_that_break_it(make_db):
    db = await make_db(shards=1)
    async with db.shard("s0") as conn:
        for ddl in [
            "CREATE TABLE no_slot (k TEXT)",
            "CREATE TABLE slot_no_index (slot INT NOT NULL, k TEXT)",
            "CREATE TABLE slot_second (slot INT NOT NULL, k TEXT)",
            "CREATE INDEX slot_second_k ON slot_second (k, slot)",
            "CREATE TABLE good (slot INT NOT NULL, k TEXT)",
            "CREATE INDEX good_slot ON good (slot, k)",
            "CREATE TABLE good_pk (slot INT NOT NULL, k TEXT NOT NULL, PRIMARY KEY (slot, k))",
        ]:
            await conn.execute(ddl)
    assert await slot_convention(db.pool("s0")) == [
        "no_slot: no slot column",
        "slot_no_index: no index starting with slot",
        "slot_second: no index starting with slot",
    ]
    statuses = {s.database: s for s in await schema_status(db)}
    assert len(statuses["s0"].convention) == 3
    assert statuses["catalog"].convention == []
