"""The per-shard guard (data/guard.py): a dead shard fails fast, a stalled one costs only itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from tenfold.data.base import Connection, Pool, PoolOptions, PoolStats
from tenfold.data.guard import Guarded, GuardOptions, ShardGuard
from tenfold.errors import (
    ConstraintViolation,
    ShardBusy,
    ShardTimeout,
    ShardUnavailable,
)
from tenfold.limits.admission import AdmissionController
from tenfold.resilience import BreakerState


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakePool(Pool):
    """Counts acquires; `fail` makes every acquire raise, `gate` makes it block."""

    dialect = "fake"

    def __init__(self, name: str = "s3") -> None:
        super().__init__(name, f"postgresql://app:secret@db/{name}", PoolOptions())
        self.acquires = 0
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None

    def acquire(self, slot: int | None = None) -> AbstractAsyncContextManager[Connection]:
        return self._acquire()

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:
        self.acquires += 1
        if self.fail is not None:
            raise self.fail
        if self.gate is not None:
            await self.gate.wait()
        yield object()

    async def close(self) -> None:
        pass

    def stats(self) -> PoolStats:
        return PoolStats(0, 0, 1)


def _guard(pool: FakePool, clock: FakeClock, **options: Any) -> ShardGuard:
    defaults: dict[str, Any] = {"max_concurrent": 2, "max_wait_s": 0.05, "failures": 3}
    return ShardGuard(
        pool.name, pool.safe_url, GuardOptions(**{**defaults, **options}), clock=clock
    )


async def test_a_dead_shard_trips_its_breaker_and_then_fails_without_trying():
    clock, pool = FakeClock(), FakePool()
    guard = _guard(pool, clock, open_s=2.0)
    pool.fail = ShardUnavailable("s3", pool.safe_url, "connection refused")
    for _ in range(3):
        with pytest.raises(ShardUnavailable):
            async with Guarded(guard, pool, 7):
                pass
    assert pool.acquires == 3 and guard.breaker.state is BreakerState.OPEN

    with pytest.raises(ShardUnavailable) as exc_info:
        async with Guarded(guard, pool, 7):
            pass
    assert pool.acquires == 3  # not even tried: failed fast
    err = exc_info.value
    assert err.shard == "s3" and err.retry_after_s == pytest.approx(2.0)
    assert "circuit breaker is open" in str(err) and "secret" not in str(err)
    assert guard.bulkhead.in_use == 0

    clock.now += 2.0  # one probe goes through; the shard is back, so it closes
    pool.fail = None
    async with Guarded(guard, pool, 7):
        pass
    assert guard.breaker.state is BreakerState.CLOSED


async def test_only_this_shards_faults_count_against_its_breaker():
    clock, pool = FakeClock(), FakePool()
    guard = _guard(pool, clock, failures=1)
    for exc in (
        ConstraintViolation("s3", "duplicate key"),  # the caller's fault
        ShardUnavailable("s9", "u", "down"),  # another shard, passing through
        ShardBusy("s3", 2, 0.05),  # a nested lease refused: the shard was not tried
        ShardUnavailable("s3", "u", "open", retry_after_s=1.0),  # a breaker refusal
        RuntimeError("the app's own error"),
    ):
        with pytest.raises(type(exc)):
            async with Guarded(guard, pool, None):
                raise exc
    assert guard.breaker.state is BreakerState.CLOSED
    with pytest.raises(ShardTimeout):
        async with Guarded(guard, pool, None):
            raise ShardTimeout("s3", 1.0)
    assert guard.breaker.state is BreakerState.OPEN
    assert guard.bulkhead.in_use == 0


async def test_a_stalled_shard_holds_only_its_bulkhead_and_is_named_in_one_log_line(caplog):
    clock, pool = FakeClock(), FakePool()
    guard = _guard(pool, clock, max_concurrent=2, max_wait_s=0.05, log_every_s=10.0)
    pool.gate = asyncio.Event()  # every lease blocks: the shard hangs

    async def request() -> None:
        async with Guarded(guard, pool, None):
            pass

    stuck = [asyncio.create_task(request()) for _ in range(2)]
    await asyncio.sleep(0)
    assert guard.bulkhead.in_use == 2

    # Full, but it just filled up: a caller waits its bounded time, then ShardBusy.
    with pytest.raises(ShardBusy) as exc_info:
        await request()
    assert exc_info.value.shard == "s3"

    clock.now += 0.06  # nothing freed for max_wait_s: stalled, refused at once
    caplog.set_level(logging.WARNING, logger="tenfold.data")
    for _ in range(50):
        with pytest.raises(ShardBusy):
            await asyncio.wait_for(request(), 0.01)  # no waiting at all
    stalls = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert len(stalls) == 1 and "shard s3 stalled" in stalls[0].getMessage()  # rate-limited
    assert guard.state()["stalled"] is True
    assert guard.breaker.state is BreakerState.CLOSED  # refusals are not the shard's faults
    assert pool.acquires == 2

    pool.gate.set()  # the locks go away
    await asyncio.gather(*stuck)
    assert guard.bulkhead.in_use == 0 and not guard.state()["stalled"]
    await request()


async def test_a_cancelled_lease_gives_back_its_slot_and_ticket():
    clock, pool = FakeClock(), FakePool()
    guard = _guard(pool, clock, max_concurrent=1, failures=1)
    pool.gate = asyncio.Event()

    async def request() -> None:
        async with Guarded(guard, pool, None):
            pass

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(request())
    await asyncio.sleep(0)
    waiter.cancel()
    task.cancel()
    for t in (task, waiter):
        with pytest.raises(asyncio.CancelledError):
            await t
    assert guard.bulkhead.in_use == 0 and guard.bulkhead.waiting == 0
    assert guard.breaker.state is BreakerState.CLOSED
    pool.gate.set()
    await request()


async def test_a_failed_lease_renewal_is_retried_after_the_house_backoff(monkeypatch, tmp_path):
    """Not a whole third of the lease later (two failures in a row lapsed it), nor at once."""
    from tenfold import ShardedDatabase
    from tenfold.config import Settings
    from tenfold.errors import ShardUnavailable as Unavailable

    settings = Settings(
        catalog_url=f"sqlite:///{tmp_path}/catalog.db", shard_url=f"sqlite:///{tmp_path}/s{{n}}.db"
    )
    db = ShardedDatabase(settings)
    lease_s = 60.0
    waits: list[float] = []
    outcomes: list[BaseException | bool] = [
        Unavailable("catalog", "u", "down"),
        Unavailable("catalog", "u", "down"),
        True,
        False,  # taken over: the loop ends
    ]
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    async def renew(lease: Any, seconds: float) -> bool:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(db.catalog, "renew", renew)
    db._lease = type("Lease", (), {"worker": 7})()  # type: ignore[assignment]
    await asyncio.wait_for(db._renew_lease(lease_s), 5)
    assert outcomes == []
    first, retry1, retry2, after_success = waits
    assert first == lease_s / 3 and after_success == lease_s / 3
    # Jittered retries, capped at a sixth of the lease, growing from a small start.
    assert 0 < retry1 <= min(0.1, lease_s / 60)
    assert 0 < retry2 <= 2 * min(0.1, lease_s / 60)
    assert retry1 != retry2


class _Recorder:
    """A fixed admission limit that records the latency samples it is fed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.samples: list[float] = []

    def on_sample(self, rtt_s: float, in_flight: int, *, dropped: bool = False) -> None:
        self.samples.append(rtt_s)


@pytest.mark.parametrize("fault", ["unreachable", "breaker-open", "busy"])
async def test_a_shard_fault_steps_the_request_aside_from_admission(fault):
    """Its latency measures the bad shard: fed to the adaptive limit, it shrank the budget."""
    clock, pool = FakeClock(), FakePool()
    guard = _guard(pool, clock, failures=1, max_concurrent=1, max_wait_s=0.0)
    algorithm = _Recorder(limit=4)
    admission = AdmissionController(algorithm, max_queue=0)
    if fault == "breaker-open":
        pool.fail = ShardUnavailable("s3", pool.safe_url, "connection refused")
        with pytest.raises(ShardUnavailable):
            async with Guarded(guard, pool, 1):
                pass
    holder = None
    if fault == "busy":
        pool.gate = asyncio.Event()
        holder = asyncio.create_task(Guarded(guard, pool, 1).__aenter__())
        await asyncio.sleep(0)
    if fault == "unreachable":
        pool.fail = ShardUnavailable("s3", pool.safe_url, "connection refused")
    async with admission.admit("user"):
        with pytest.raises((ShardUnavailable, ShardBusy)):
            async with Guarded(guard, pool, 1):
                pass
        assert admission.in_flight == 0  # the slot went back at the fault
    assert algorithm.samples == []
    async with admission.admit("user"):  # a healthy request still feeds its sample
        pass
    assert len(algorithm.samples) == 1
    if holder is not None:
        holder.cancel()
