"""`read_for` spreads reads over healthy replicas, skips dead ones for a while, falls back."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tenfold import ShardedDatabase, slot_of
from tenfold.config import Settings, ShardSpec
from tests import services
from tests.integration.support import FakeClock, free_port, key_on, opened, with_shards


def _dead_url(backend: str, tmp_path: Path, name: str) -> str:
    if backend == "postgres":
        return f"postgresql://postgres:pw@127.0.0.1:{free_port()}/x"
    blocker = tmp_path / f"{name}_blocker"
    blocker.write_text("a file where a directory should be")
    return f"sqlite:///{blocker}/{name}.db"


def _replace_replicas(settings: Settings, shard: str, replicas: list[str]) -> Settings:
    specs = [
        ShardSpec(name=s.name, url=s.url, replicas=replicas if s.name == shard else s.replicas)
        for s in settings.shards
    ]
    return with_shards(settings, specs)


async def _mark(pool, who: str) -> None:
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE m (slot INT NOT NULL, who TEXT)")
        await conn.execute("INSERT INTO m (slot, who) VALUES (0, $1)", who)


async def _mark_all(db: ShardedDatabase, shard: str, replicas: list[int]) -> None:
    await _mark(db.pool(shard), "primary")
    for i in replicas:
        await _mark(db._shards[shard].replicas[i], f"replica{i}")


async def _reads(db: ShardedDatabase, key, n: int) -> list[str]:
    seen = []
    for _ in range(n):
        async with db.read_for(key) as conn:
            who = await conn.fetchval("SELECT who FROM m")
            assert conn.slot == slot_of(key)
            assert conn.shard == ("s0" if who == "primary" else f"s0/{who}")
            seen.append(who)
    return seen


async def test_reads_round_robin_over_replicas(make_db):
    db = await make_db(shards=2, replicas=2, migrate=False)
    await _mark_all(db, "s0", [0, 1])
    key = key_on(db, "s0")
    assert Counter(await _reads(db, key, 6)) == {"replica0": 3, "replica1": 3}
    # Writes still go to the primary.
    async with db.shard_for(key) as conn:
        assert conn.shard == "s0"
        assert await conn.fetchval("SELECT who FROM m") == "primary"


@pytest.mark.timeout(60)
async def test_reads_survive_a_dead_replica(make_settings, backend, tmp_path):
    base = make_settings(shards=2, replicas=2, connect_timeout_s=0.5)
    good = base.shards[0].replicas[0]
    settings = _replace_replicas(base, "s0", [good, _dead_url(backend, tmp_path, "r1")])
    async with opened(settings) as db:
        await _mark_all(db, "s0", [0])
        key = key_on(db, "s0")
        assert await _reads(db, key, 6) == ["replica0"] * 6


@pytest.mark.timeout(60)
async def test_reads_fall_back_to_the_primary(make_settings, backend, tmp_path):
    base = make_settings(shards=2, replicas=2, connect_timeout_s=0.5)
    dead = [_dead_url(backend, tmp_path, "r0"), _dead_url(backend, tmp_path, "r1")]
    settings = _replace_replicas(base, "s0", dead)
    async with opened(settings) as db:
        await _mark_all(db, "s0", [])
        key = key_on(db, "s0")
        assert await _reads(db, key, 4) == ["primary"] * 4
        # Another shard's replicas are untouched by s0's trouble.
        other = key_on(db, "s1")
        async with db.read_for(other) as conn:
            assert conn.shard.startswith("s1/replica")


@pytest.mark.timeout(60)
async def test_dead_replica_is_retried_after_replica_retry_s(
    make_settings, backend, tmp_path, request
):
    base = make_settings(shards=1, replicas=2, connect_timeout_s=0.5, replica_retry_s=2.0)
    good = base.shards[0].replicas[0]
    missing: list[str] = []
    if backend == "postgres":
        # A database that does not exist yet: unreachable now, created later.
        admin = request.getfixturevalue("pg_admin_url")
        missing.append(services.unique_name("tft_replica"))
        dead = services.database_url(admin, missing[0])
    else:
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where a directory should be")
        dead = f"sqlite:///{blocker}/r1.db"
    settings = _replace_replicas(base, "s0", [good, dead])
    clock = FakeClock()
    try:
        async with opened(settings, clock) as db:
            await _mark_all(db, "s0", [0])
            key = key_on(db, "s0")
            assert await _reads(db, key, 3) == ["replica0"] * 3  # replica1 failed, marked down

            # The replica comes back...
            if backend == "postgres":
                await services.create_databases(admin, missing)
            else:
                blocker.unlink()
                blocker.mkdir()
            await _mark(db._shards["s0"].replicas[1], "replica1")

            # ...but is not tried again until replica_retry_s has passed.
            clock.now += 1.5
            assert await _reads(db, key, 4) == ["replica0"] * 4
            clock.now += 1.0
            assert Counter(await _reads(db, key, 4)) == {"replica0": 2, "replica1": 2}
    finally:
        if missing:
            await services.drop_databases(admin, missing)
