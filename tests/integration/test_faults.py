"""One unreachable shard fails only its own keys; the others still serve."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from tenfold import ShardedDatabase
from tenfold.config import Settings, ShardSpec
from tenfold.errors import ScatterError, ShardUnavailable
from tests import services
from tests.integration.support import free_port, key_on, opened, with_shards

DEAD = "s3"
PASSWORD = "s3cret"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose socket listens (the kernel completes the handshake) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def _with_dead_shard(settings: Settings, url: str) -> Settings:
    return with_shards(settings, [*settings.shards, ShardSpec(name=DEAD, url=url)])


async def _assert_only_dead_shard_fails(db: ShardedDatabase, dead_url: str, connect_s: float):
    live = [n for n in db.shard_names if n != DEAD]
    assert db.topology.shards == (*live, DEAD)
    for name in live:
        async with db.shard(name) as conn:
            await conn.execute("CREATE TABLE t (slot INT NOT NULL, k TEXT PRIMARY KEY)")

    dead_key = key_on(db, DEAD)
    for _ in range(2):  # a failed connect is retried by the next request, bounded again
        start = time.monotonic()
        with pytest.raises(ShardUnavailable) as exc_info:
            async with db.shard_for(dead_key) as conn:
                await conn.fetchval("SELECT 1")
        assert time.monotonic() - start < connect_s * 2 + 1.5
        err = exc_info.value
        message = str(err)
        assert err.shard == DEAD
        assert f"shard {DEAD}" in message
        assert db.pool(DEAD).safe_url in message
        assert PASSWORD not in message
        assert PASSWORD not in repr(err.args)
        if dead_url.startswith("postgresql"):
            assert "postgres:***@127.0.0.1" in message
            assert err.url == dead_url.replace(PASSWORD, "***")

    # Keys on the other shards read and write, in the same test, after the failures.
    live_keys = [key_on(db, name) for name in live]
    for key in live_keys:
        async with db.shard_for(key) as conn:
            assert await conn.insert("t", {"k": key}) == 1
        async with db.read_for(key) as conn:
            assert await conn.fetchval("SELECT k FROM t WHERE k = $1", key) == key

    # A request on a live shard does not wait behind the dead shard's connect.
    async def dead_request() -> None:
        async with db.shard_for(dead_key):
            pass

    dead_task = asyncio.create_task(dead_request())
    await asyncio.sleep(0)
    start = time.monotonic()
    async with db.shard_for(live_keys[0]) as conn:
        assert await conn.fetchval("SELECT COUNT(*) FROM t") == 1
    assert time.monotonic() - start < 0.4
    with pytest.raises(ShardUnavailable):
        await dead_task

    partial = await db.scatter("SELECT k FROM t", partial=True, order_by="k")
    assert set(partial.failed) == {DEAD}
    assert isinstance(partial.failed[DEAD], ShardUnavailable)
    assert not partial.complete
    assert set(partial.by_shard) == set(live)
    assert [r["k"] for r in partial.rows] == sorted(live_keys)

    with pytest.raises(ScatterError) as exc_info:
        await db.scatter("SELECT k FROM t")
    assert set(exc_info.value.failed) == {DEAD}
    assert f"{DEAD}:" in str(exc_info.value)
    assert PASSWORD not in str(exc_info.value)

    health = {h.name: h for h in await db.health()}
    assert set(health) == {*live, DEAD}
    assert not health[DEAD].reachable
    assert health[DEAD].rtt_ms is None
    assert health[DEAD].error and DEAD in health[DEAD].error
    assert PASSWORD not in health[DEAD].error
    assert PASSWORD not in health[DEAD].url
    for name in live:
        assert health[name].reachable, health[name].error
        assert health[name].rtt_ms is not None and health[name].rtt_ms > 0
        assert health[name].error is None


@pytest.mark.timeout(60)
async def test_unreachable_shard_fails_alone(make_settings, backend, tmp_path):
    if backend == "postgres":
        dead_url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/x"
    else:
        blocker = tmp_path / "not_a_dir"
        blocker.write_text("a regular file where a directory should be")
        dead_url = f"sqlite:///{blocker}/shard3.db"
    settings = _with_dead_shard(make_settings(shards=3, connect_timeout_s=0.5), dead_url)
    async with opened(settings) as db:  # open() does not contact shards
        await _assert_only_dead_shard_fails(db, dead_url, 0.5)


@pytest.mark.postgres
@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["postgres"])
async def test_silent_server_is_bounded_by_connect_timeout(make_settings, silent_port):
    dead_url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{silent_port}/x"
    settings = _with_dead_shard(make_settings(shards=3, connect_timeout_s=0.5), dead_url)
    async with opened(settings) as db:  # open() does not contact shards
        start = time.monotonic()
        with pytest.raises(ShardUnavailable, match=r"within 0\.5 s"):
            async with db.shard(DEAD):
                pass
        assert 0.4 <= time.monotonic() - start < 2.0
        await _assert_only_dead_shard_fails(db, dead_url, 0.5)


@pytest.mark.postgres
@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["postgres"])
async def test_missing_shard_database_points_to_migrate(make_settings, pg_admin_url):
    settings = make_settings(shards=1)
    missing = services.unique_name("tft_missing")
    settings = with_shards(
        settings,
        [*settings.shards, ShardSpec(name="s1", url=services.database_url(pg_admin_url, missing))],
    )
    try:
        async with opened(settings) as db:  # open() does not contact shards
            with pytest.raises(ShardUnavailable, match="tenfold db migrate") as exc_info:
                async with db.shard("s1"):
                    pass
            assert exc_info.value.shard == "s1"
            assert missing in str(exc_info.value)
            async with db.shard("s0") as conn:  # the existing shard is unaffected
                assert await conn.fetchval("SELECT 1") == 1

            with pytest.raises(ShardUnavailable, match="s1"):
                await db.migrate(create=False)

            applied = await db.migrate()
            assert set(applied) == {"catalog", "s0", "s1"}
            async with db.shard("s1") as conn:
                await conn.execute("CREATE TABLE t (slot INT NOT NULL)")
                assert await conn.fetchval("SELECT current_database()") == missing
            assert await db.migrate() == {"catalog": [], "s0": [], "s1": []}
    finally:
        await services.drop_databases(pg_admin_url, [missing])
