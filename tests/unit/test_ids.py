"""Id generation: layout, ordering, clock handling, threads, and uniqueness across processes."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenfold.data import migrations
from tenfold.data.base import pool_from_url
from tenfold.data.catalog import Catalog
from tenfold.errors import KeyspaceError
from tenfold.ids import (
    ID_EPOCH_MS,
    MAX_WORKERS,
    IdGenerator,
    created_ms_of_id,
    slot_of_id,
    worker_of_id,
)
from tenfold.keyspace import SLOTS, slot_of

keys = st.one_of(st.text(), st.integers(), st.binary(), st.uuids())
GEN = IdGenerator(37)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class StepClock:
    """A fake clock: returns `values` in turn, then keeps returning the last one."""

    def __init__(self, values: list[int]) -> None:
        self.values = values
        self.calls = 0

    def __call__(self) -> int:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return value


# --- layout --------------------------------------------------------------


@given(keys, st.integers(0, MAX_WORKERS - 1))
def test_ids_are_positive_63_bit_and_carry_slot_and_worker(key: object, worker: int) -> None:
    gen = IdGenerator(worker)
    before = _now_ms()
    id_ = gen.next_id(key)  # type: ignore[arg-type]
    after = _now_ms()
    assert type(id_) is int
    assert 0 < id_ < 2**63
    assert slot_of_id(id_) == slot_of(key)  # type: ignore[arg-type]
    assert worker_of_id(id_) == worker
    assert before <= created_ms_of_id(id_) <= after


def test_created_ms_is_close_to_now() -> None:
    id_ = GEN.next_id("alice")
    assert abs(created_ms_of_id(id_) - _now_ms()) < 50


def test_fields_decode_from_a_known_layout() -> None:
    ms = ID_EPOCH_MS + 123_456_789
    gen = IdGenerator(5, clock_ms=lambda: ms)
    first = gen.next_id_for_slot(4095)
    second = gen.next_id_for_slot(4095)
    # 41 bits time | 12 bits slot | 6 bits worker | 4 bits sequence
    assert first == (123_456_789 << 22) | (4095 << 10) | (5 << 4) | 0
    assert second == first + 1
    assert created_ms_of_id(first) == ms
    assert (slot_of_id(first), worker_of_id(first)) == (4095, 5)


# --- ordering ------------------------------------------------------------


def test_ids_strictly_increase_per_slot_and_sort_by_time() -> None:
    gen = IdGenerator(1)
    per_slot: dict[int, list[int]] = defaultdict(list)
    all_ids = []
    for i in range(20_000):
        slot = (i * 7) % 5  # a few hot slots, so sequences fill up and roll over
        id_ = gen.next_id_for_slot(slot)
        per_slot[slot].append(id_)
        all_ids.append(id_)
    assert len(set(all_ids)) == len(all_ids)
    for slot, ids in per_slot.items():
        assert all(a < b for a, b in itertools.pairwise(ids)), slot
        assert {slot_of_id(i) for i in ids} == {slot}
        times = [created_ms_of_id(i) for i in ids]
        assert times == sorted(times)
    # Sorting all ids sorts them by creation time.
    by_id = [created_ms_of_id(i) for i in sorted(all_ids)]
    assert by_id == sorted(by_id)


def test_the_seventeenth_id_in_a_millisecond_waits_for_the_next() -> None:
    t0 = ID_EPOCH_MS + 1_000_000
    # 16 clock reads at t0 (one per id), then a few more at t0 while it waits, then t0+1.
    clock = StepClock([t0] * 20 + [t0 + 1])
    gen = IdGenerator(3, clock_ms=clock)
    ids = [gen.next_id_for_slot(9) for _ in range(17)]
    assert len(set(ids)) == 17
    assert ids == sorted(ids)
    assert [created_ms_of_id(i) for i in ids[:16]] == [t0] * 16
    assert created_ms_of_id(ids[16]) == t0 + 1
    assert clock.calls > 17  # it did wait, re-reading the clock
    # Other slots have their own sequence: still room at t0+1.
    other = gen.next_id_for_slot(10)
    assert created_ms_of_id(other) == t0 + 1


def test_a_frozen_clock_never_yields_duplicates() -> None:
    t0 = ID_EPOCH_MS + 5_000_000
    calls = 0

    def clock() -> int:  # advances one millisecond every 40 reads
        nonlocal calls
        calls += 1
        return t0 + calls // 40

    gen = IdGenerator(0, clock_ms=clock)
    ids = [gen.next_id_for_slot(1) for _ in range(200)]
    assert len(set(ids)) == 200
    assert all(a < b for a, b in itertools.pairwise(ids))
    per_ms = defaultdict(int)
    for i in ids:
        per_ms[created_ms_of_id(i)] += 1
    assert max(per_ms.values()) <= 16


def test_a_clock_that_steps_back_is_waited_out() -> None:
    t0 = ID_EPOCH_MS + 9_000_000
    # 3 ids at t0+10, then the clock jumps back 5 ms and creeps forward again.
    clock = StepClock([t0 + 10] * 3 + [t0 + 5, t0 + 6, t0 + 8, t0 + 10, t0 + 10, t0 + 11])
    gen = IdGenerator(2, clock_ms=clock)
    ids = [gen.next_id_for_slot(7) for _ in range(5)]
    assert len(set(ids)) == 5
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert [created_ms_of_id(i) for i in ids[:3]] == [t0 + 10] * 3
    # Never back in time, and the millisecond it stepped back to is not reused.
    assert created_ms_of_id(ids[3]) == t0 + 11


# --- errors --------------------------------------------------------------


@pytest.mark.parametrize("worker", [-1, MAX_WORKERS, 1000])
def test_worker_out_of_range_is_refused(worker: int) -> None:
    with pytest.raises(KeyspaceError, match=str(worker)):
        IdGenerator(worker)


@pytest.mark.parametrize("bad", [0, -1, -(2**62), 2**63, 2**64, "123", 1.0, None, True])
def test_id_decoders_refuse_non_ids(bad: object) -> None:
    for decode in (slot_of_id, created_ms_of_id, worker_of_id):
        with pytest.raises(KeyspaceError):
            decode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("slot", [-1, SLOTS])
def test_slot_out_of_range_is_refused(slot: int) -> None:
    with pytest.raises(KeyspaceError):
        GEN.next_id_for_slot(slot)


def test_a_lapsed_lease_stops_id_generation() -> None:
    valid = True
    gen = IdGenerator(4, valid_until=lambda: valid)
    assert worker_of_id(gen.next_id("x")) == 4
    valid = False
    with pytest.raises(KeyspaceError, match="lease"):
        gen.next_id("x")
    with pytest.raises(KeyspaceError, match="lease"):
        gen.next_id_for_slot(0)


# --- threads -------------------------------------------------------------


def test_threads_sharing_a_generator_get_unique_ids() -> None:
    gen = IdGenerator(9)
    results: list[list[int]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def work(n: int) -> None:
        start.wait()
        out = results[n]
        for i in range(20_000):
            out.append(gen.next_id_for_slot((i * 131 + n) % SLOTS))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for r in results for i in r]
    assert len(all_ids) == 160_000
    assert len(set(all_ids)) == len(all_ids)
    # Each thread's ids of one slot still increase in the order it received them.
    for r in results:
        last: dict[int, int] = {}
        for id_ in r:
            slot = slot_of_id(id_)
            assert id_ > last.get(slot, 0)
            last[slot] = id_


# --- across processes ----------------------------------------------------

CHILD = """
import asyncio, pathlib, sys, time
from tenfold.data.base import pool_from_url
from tenfold.data.catalog import Catalog
from tenfold.ids import IdGenerator

url, out, ready, go, count, *keys = sys.argv[1:]

async def main():
    pool = pool_from_url("catalog", url)
    catalog = Catalog(pool)
    lease = await catalog.lease_worker(60)
    pathlib.Path(ready).write_text(str(lease.worker))
    deadline = time.monotonic() + 30
    while not pathlib.Path(go).exists():  # start generating together
        if time.monotonic() > deadline:
            raise SystemExit("never told to go")
        await asyncio.sleep(0.002)
    gen = IdGenerator(lease.worker, valid_until=lease.valid)
    ids = [gen.next_id(keys[i % len(keys)]) for i in range(int(count))]
    pathlib.Path(out).write_text("\\n".join(map(str, ids)))
    await pool.close()

asyncio.run(main())
"""


async def _migrated_catalog(url: str) -> Catalog:
    pool = pool_from_url("catalog", url)
    await migrations.apply(pool, migrations.discover(migrations.BUILTIN_DIR, "catalog", "tenfold"))
    return Catalog(pool)


async def _held_workers(url: str) -> list[tuple[int, str]]:
    pool = pool_from_url("catalog", url)
    try:
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT worker, owner FROM tenfold_id_workers")
        return [(int(r[0]), str(r[1])) for r in rows]
    finally:
        await pool.close()


def test_processes_with_leased_workers_never_issue_the_same_id(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/catalog.db"
    catalog = asyncio.run(_migrated_catalog(url))
    asyncio.run(catalog.pool.close())
    procs_n, per_proc = 4, 30_000
    keys_ = ["alice", "bob", "carol"]  # every process competes for the same 3 slots
    slots = {slot_of(k) for k in keys_}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                url,
                str(tmp_path / f"ids{n}"),
                str(tmp_path / f"ready{n}"),
                str(go),
                str(per_proc),
                *keys_,
            ],
            stderr=subprocess.PIPE,
        )
        for n in range(procs_n)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{n}").exists() for n in range(procs_n)):
            dead = [p for p in procs if p.poll() not in (None, 0)]
            assert not dead, dead[0].stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "children never leased a worker"
            time.sleep(0.01)
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    workers = [int((tmp_path / f"ready{n}").read_text()) for n in range(procs_n)]
    assert len(set(workers)) == procs_n
    held = asyncio.run(_held_workers(url))
    assert sorted(w for w, _ in held) == sorted(workers)
    assert len({owner for _, owner in held}) == procs_n

    per_process = [
        [int(x) for x in (tmp_path / f"ids{n}").read_text().split()] for n in range(procs_n)
    ]
    union: set[int] = set()
    for worker, ids in zip(workers, per_process, strict=True):
        assert len(ids) == per_proc
        assert {worker_of_id(i) for i in ids} == {worker}
        assert {slot_of_id(i) for i in ids} == slots
        union.update(ids)
    assert len(union) == procs_n * per_proc
    # They really competed: the same (time, slot, sequence) was used by several
    # processes, so only the worker field kept those ids apart.
    worker_mask = (MAX_WORKERS - 1) << 4
    without_worker = [{i & ~worker_mask for i in ids} for ids in per_process]
    shared = set.intersection(*without_worker[:2])
    assert len(shared) > 100


# --- worker leases -------------------------------------------------------


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[Catalog]:
    cat = await _migrated_catalog(f"sqlite:///{tmp_path}/leases.db")
    yield cat
    await cat.pool.close()


async def test_two_leases_get_different_workers(catalog: Catalog) -> None:
    a = await catalog.lease_worker(60)
    b = await catalog.lease_worker(60)
    assert a.worker != b.worker
    assert a.owner != b.owner
    assert 0 <= a.worker < MAX_WORKERS and 0 <= b.worker < MAX_WORKERS
    assert a.valid() and b.valid()


async def test_release_makes_the_number_available_again(catalog: Catalog) -> None:
    a = await catalog.lease_worker(60)
    b = await catalog.lease_worker(60)
    await catalog.release(a)
    assert not a.valid()
    c = await catalog.lease_worker(60)
    assert c.worker == a.worker
    assert c.worker != b.worker


async def test_an_expired_lease_is_taken_over_and_cannot_be_renewed(catalog: Catalog) -> None:
    old = await catalog.lease_worker(0.01)
    await asyncio.sleep(0.05)
    new = await catalog.lease_worker(60)
    assert new.worker == old.worker
    assert new.owner != old.owner
    assert await catalog.renew(old, 60) is False
    assert not old.valid()
    assert await catalog.renew(new, 60) is True
    # Releasing the stale lease must not free the new owner's number.
    await catalog.release(old)
    other = await catalog.lease_worker(60)
    assert other.worker != new.worker


async def test_renew_extends_a_live_lease(catalog: Catalog) -> None:
    lease = await catalog.lease_worker(3)
    before = lease.expires_at
    assert await catalog.renew(lease, 60) is True
    assert lease.expires_at >= before + 50
    assert lease.valid()


async def test_a_lease_is_not_valid_within_two_seconds_of_expiry(catalog: Catalog) -> None:
    short = await catalog.lease_worker(1)
    assert not short.valid()
    gen = IdGenerator(short.worker, valid_until=short.valid)
    with pytest.raises(KeyspaceError, match="lease"):
        gen.next_id("alice")
    longer = await catalog.lease_worker(30)
    assert longer.valid()


async def test_leasing_more_workers_than_exist_fails(catalog: Catalog) -> None:
    leases = [await catalog.lease_worker(60) for _ in range(MAX_WORKERS)]
    assert sorted(lease.worker for lease in leases) == list(range(MAX_WORKERS))
    with pytest.raises(KeyspaceError, match=str(MAX_WORKERS)):
        await catalog.lease_worker(60)
