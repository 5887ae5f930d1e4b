"""The topology lives in the catalog: created once, shared, refreshed after its TTL, CAS-saved."""

from __future__ import annotations

import asyncio

import pytest

from tenfold import ShardedDatabase, Topology, slot_of
from tenfold.errors import ConfigError, StaleEpoch
from tests.integration.support import FakeClock, key_on, opened, with_shards

NAMES = ["s0", "s1", "s2", "s3"]


async def test_first_open_stores_a_balanced_topology_at_epoch_1(make_db):
    db = await make_db(shards=4, migrate=False)
    expected = Topology.balanced(NAMES)
    assert db.topology.epoch == 1
    assert db.topology == expected
    assert await db.catalog.current_epoch() == 1
    assert await db.catalog.load_topology() == expected
    assert {r.shard: r.size for r in db.topology.ranges} == dict.fromkeys(NAMES, 1024)


async def test_a_second_instance_loads_the_same_topology(make_settings):
    settings = make_settings(shards=4)
    async with opened(settings) as first:
        moved = first.topology.with_slots_moved(range(0, 10), to="s3")
        await first.catalog.save_topology(moved)
        async with opened(settings) as second:
            assert second.topology == moved
            assert second.topology.epoch == 2
            assert second.topology.ranges == moved.ranges
            assert second.shard_name_for(_key_in_slots(range(0, 10))) == "s3"


async def test_concurrent_first_opens_agree_on_one_topology(make_settings):
    settings = make_settings(shards=3)
    dbs = [ShardedDatabase(settings) for _ in range(3)]
    try:
        await asyncio.gather(*(db.open() for db in dbs))
        assert {db.topology.epoch for db in dbs} == {1}
        assert all(db.topology == dbs[0].topology for db in dbs)
        assert await dbs[0].catalog.current_epoch() == 1
    finally:
        for db in dbs:
            await db.close()


def _key_in_slots(slots) -> str:
    wanted = set(slots)
    return next(f"k{i}" for i in range(1_000_000) if slot_of(f"k{i}") in wanted)


async def test_routing_follows_a_saved_move_after_the_ttl(make_settings):
    settings = make_settings(shards=4, topology_ttl_s=0.05)
    clock = FakeClock()
    async with opened(settings, clock) as first, opened(settings) as second:
        key = key_on(first, "s0")
        async with first.shard_for(key) as conn:
            assert conn.shard == "s0"
            await conn.execute("CREATE TABLE t (slot INT NOT NULL, k TEXT)")
        async with second.shard("s2") as conn:
            await conn.execute("CREATE TABLE t (slot INT NOT NULL, k TEXT)")

        moved = second.topology.with_slots_moved([slot_of(key)], to="s2")
        await second.catalog.save_topology(moved)

        # Within the TTL the cached epoch is used: no catalog read, old owner.
        clock.now += 0.04
        async with first.shard_for(key) as conn:
            assert conn.shard == "s0"
        assert first.topology.epoch == 1

        # After the TTL the next request re-reads the epoch and goes to the new owner.
        clock.now += 0.02
        async with first.shard_for(key) as conn:
            assert conn.shard == "s2"
            await conn.insert("t", {"k": key})
        assert first.topology.epoch == 2
        assert first.shard_name_for(key) == "s2"
        async with second.shard("s2") as conn:
            assert await conn.fetchval("SELECT slot FROM t WHERE k = $1", key) == slot_of(key)


async def test_reads_and_ids_follow_a_move_after_the_ttl(make_settings):
    settings = make_settings(shards=4, replicas=0, topology_ttl_s=0.05)
    clock = FakeClock()
    async with opened(settings, clock) as first, opened(settings) as second:
        key = key_on(first, "s1")
        id_ = first.new_id(key)
        await second.catalog.save_topology(
            second.topology.with_slots_moved([slot_of(key)], to="s3")
        )
        clock.now += 0.06
        async with first.read_for(key) as conn:
            assert conn.shard == "s3"
        clock.now += 0.06
        async with first.shard_for_id(id_) as conn:
            assert conn.shard == "s3"


@pytest.mark.timeout(30)
async def test_real_clock_ttl_picks_up_a_move(make_settings):
    settings = make_settings(shards=2, topology_ttl_s=0.05)
    async with opened(settings) as first, opened(settings) as second:
        key = key_on(first, "s0")
        await second.catalog.save_topology(
            second.topology.with_slots_moved([slot_of(key)], to="s1")
        )
        await asyncio.sleep(0.1)
        async with first.shard_for(key) as conn:
            assert conn.shard == "s1"


async def test_explicit_refresh_reports_a_change_once(make_settings):
    settings = make_settings(shards=4)  # default TTL: nothing refreshes by itself here
    async with opened(settings) as first, opened(settings) as second:
        assert await first.refresh_topology() is False
        moved = second.topology.with_slots_moved(range(100, 200), to="s1")
        await second.catalog.save_topology(moved)
        assert first.topology.epoch == 1
        assert await first.refresh_topology() is True
        assert first.topology == moved
        assert await first.refresh_topology() is False
        # Concurrent refreshers share one answer.
        await second.catalog.save_topology(moved.with_slots_moved([5], to="s2"))
        results = await asyncio.gather(*(first.refresh_topology() for _ in range(5)))
        assert True in results
        assert first.topology.epoch == 3


async def test_saving_from_a_stale_epoch_is_refused(make_db):
    db = await make_db(shards=3, migrate=False)
    base = db.topology
    await db.catalog.save_topology(base.with_slots_moved([1], to="s2"))
    with pytest.raises(StaleEpoch) as exc_info:
        await db.catalog.save_topology(base.with_slots_moved([2], to="s1"))
    err = exc_info.value
    assert (err.expected, err.current) == (1, 2)
    assert "epoch 1" in str(err)
    assert "epoch 2" in str(err)
    # An epoch from the future is refused too, and nothing was stored.
    too_new = Topology(5, base.ranges, base.shards)
    with pytest.raises(StaleEpoch):
        await db.catalog.save_topology(too_new)
    assert await db.catalog.current_epoch() == 2
    assert (await db.catalog.load_topology()).shard_of_slot(1) == "s2"


async def test_concurrent_saves_of_the_same_epoch_have_one_winner(make_settings):
    settings = make_settings(shards=4)
    async with opened(settings) as a, opened(settings) as b, opened(settings) as c:
        candidates = [
            (a, a.topology.with_slots_moved([10], to="s1")),
            (b, b.topology.with_slots_moved([10], to="s2")),
            (c, c.topology.with_slots_moved([10], to="s3")),
            (a, a.topology.with_slots_moved([11], to="s3")),
        ]
        results = await asyncio.gather(
            *(db.catalog.save_topology(t) for db, t in candidates), return_exceptions=True
        )
        winners = [t for (_, t), r in zip(candidates, results, strict=True) if r is None]
        losers = [r for r in results if r is not None]
        assert len(winners) == 1, results
        assert all(isinstance(r, StaleEpoch) for r in losers), losers
        assert all((r.expected, r.current) == (1, 2) for r in losers)
        assert await a.catalog.load_topology() == winners[0]
        assert await a.catalog.current_epoch() == 2


async def test_topology_naming_an_undefined_shard_is_a_config_error(make_settings):
    settings = make_settings(shards=3)
    async with opened(settings) as db:
        await db.catalog.save_topology(db.topology.with_slots_moved(range(50), to="s7"))
    db = ShardedDatabase(settings)
    with pytest.raises(ConfigError, match="s7"):
        await db.open()
    # The failed open let go of the catalog (no connection, no thread left behind).
    assert db.catalog.pool.stats().size == 0
    # Dropping a shard from the settings that still owns slots is refused the same way.
    fewer = with_shards(settings, settings.shards[:2])
    with pytest.raises(ConfigError, match="s2"):
        async with opened(fewer):
            pass
