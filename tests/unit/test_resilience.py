"""Resilience: breaker state machine, bulkhead bound, bounded jittered retries, deadlines."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import tenfold.resilience
from tenfold.errors import (
    BulkheadFull,
    CircuitOpen,
    ConfigError,
    ConstraintViolation,
    DeadlineExceeded,
    ResilienceError,
    ShardUnavailable,
)
from tenfold.observe import metrics
from tenfold.resilience import (
    BreakerMachine,
    BreakerPolicy,
    BreakerRegistry,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    deadline,
    idempotent,
    retry_idempotent,
)

CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_public_api_is_pinned():
    assert sorted(tenfold.resilience.__all__) == sorted(
        [
            "DEFAULT_RETRY_ON",
            "Backoff",
            "BreakerMachine",
            "BreakerPolicy",
            "BreakerRegistry",
            "BreakerState",
            "Bulkhead",
            "CircuitBreaker",
            "breakers",
            "deadline",
            "idempotent",
            "retry_idempotent",
        ]
    )


# -- breaker: table-driven transitions on the pure machine ---------------------
#
# Steps: "S" admit + success, "F" admit + failure, "X" admit is refused,
# ("wait", s) advance the fake clock. Each step is paired with the state after it.

CASES = {
    "closed to open after the consecutive threshold": (
        {"failure_threshold": 3},
        [("F", CLOSED), ("F", CLOSED), ("F", OPEN)],
    ),
    "a success resets the consecutive count": (
        {"failure_threshold": 3},
        [("F", CLOSED), ("F", CLOSED), ("S", CLOSED), ("F", CLOSED), ("F", CLOSED), ("F", OPEN)],
    ),
    "open rejects until open_s has passed, then half-open": (
        {"failure_threshold": 1, "open_s": 30},
        [("F", OPEN), ("X", OPEN), (("wait", 29.9), OPEN), ("X", OPEN), (("wait", 0.1), HALF)],
    ),
    "probe success closes": (
        {"failure_threshold": 1, "open_s": 5},
        [("F", OPEN), (("wait", 5), HALF), ("S", CLOSED), ("S", CLOSED)],
    ),
    "probe failure re-opens and restarts the timer": (
        {"failure_threshold": 1, "open_s": 5},
        [
            ("F", OPEN),
            (("wait", 5), HALF),
            ("F", OPEN),
            (("wait", 4.9), OPEN),
            ("X", OPEN),
            (("wait", 0.1), HALF),
            ("S", CLOSED),
        ],
    ),
    "half-open needs half_open_max_calls successes to close": (
        {"failure_threshold": 1, "open_s": 5, "half_open_max_calls": 2},
        [("F", OPEN), (("wait", 5), HALF), ("S", HALF), ("S", CLOSED)],
    ),
    "failure rate over a full window opens": (
        {"failure_threshold": None, "failure_rate": 0.5, "window_calls": 4},
        [("F", CLOSED), ("F", CLOSED), ("S", CLOSED), ("F", OPEN)],  # 3/4 >= 0.5
    ),
    "failure rate below the threshold stays closed as the window slides": (
        {"failure_threshold": None, "failure_rate": 0.75, "window_calls": 4},
        # the window ends F,S,S,F (0.5), then S,S,F,F (0.5), then S,F,F,F (0.75)
        [
            ("F", CLOSED),
            ("F", CLOSED),
            ("S", CLOSED),
            ("S", CLOSED),
            ("F", CLOSED),
            ("F", CLOSED),
            ("F", OPEN),
        ],
    ),
    "closing clears the failure-rate window": (
        {"failure_threshold": None, "failure_rate": 0.5, "window_calls": 2, "open_s": 1},
        [("F", CLOSED), ("F", OPEN), (("wait", 1), HALF), ("S", CLOSED), ("F", CLOSED)],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_breaker_transitions(case):
    options, steps = CASES[case]
    clock = FakeClock()
    machine = BreakerMachine(BreakerPolicy(**options), clock=clock)
    for i, (step, expected) in enumerate(steps):
        if isinstance(step, tuple):
            clock.now += step[1]
        elif step == "X":
            assert machine.admit() is None, f"step {i}: admitted while it should refuse"
        else:
            ticket = machine.admit()
            assert ticket is not None, f"step {i}: refused"
            (machine.succeeded if step == "S" else machine.failed)(ticket)
        assert machine.state is expected, f"step {i} ({step}): {machine.state} != {expected}"


def test_half_open_limits_concurrent_probes():
    clock = FakeClock()
    machine = BreakerMachine(
        BreakerPolicy(failure_threshold=1, open_s=1, half_open_max_calls=2), clock=clock
    )
    machine.failed(machine.admit() or 0)
    clock.now += 1
    first, second = machine.admit(), machine.admit()
    assert first is not None and second is not None
    assert machine.admit() is None  # third probe refused while two are in flight
    machine.release(first)  # a cancelled probe frees its slot
    third = machine.admit()
    assert third is not None
    assert machine.probes_in_flight == 2


def test_results_of_calls_admitted_before_a_transition_are_ignored():
    clock = FakeClock()
    machine = BreakerMachine(BreakerPolicy(failure_threshold=1, open_s=1), clock=clock)
    slow = machine.admit()
    assert slow is not None
    machine.failed(machine.admit() or 0)
    assert machine.state is OPEN
    clock.now += 1
    assert machine.state is HALF
    machine.succeeded(slow)  # a closed-era success must not close the half-open breaker
    assert machine.state is HALF
    probe = machine.admit()
    assert probe is not None
    machine.succeeded(probe)
    assert machine.state is CLOSED


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"failure_threshold": None, "failure_rate": None}, "failure_threshold"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"window_calls": 0}, "window_calls"),
        ({"open_s": 0}, "open_s"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
    ],
)
def test_breaker_policy_is_validated(options, setting):
    with pytest.raises(ConfigError) as info:
        BreakerPolicy(**options)
    assert info.value.setting == setting


# -- breaker: the invariant, as a Hypothesis state machine ---------------------


class BreakerModel(RuleBasedStateMachine):
    """Never more than half_open_max_calls in flight while half-open; open never admits."""

    @initialize(
        threshold=st.integers(1, 4),
        rate=st.none() | st.floats(0.1, 1.0),
        window=st.integers(1, 6),
        max_calls=st.integers(1, 3),
        open_s=st.floats(0.5, 10.0),
    )
    def setup(self, threshold, rate, window, max_calls, open_s):
        self.clock = FakeClock()
        self.policy = BreakerPolicy(
            failure_threshold=threshold,
            failure_rate=rate,
            window_calls=window,
            open_s=open_s,
            half_open_max_calls=max_calls,
        )
        self.machine = BreakerMachine(self.policy, clock=self.clock)
        self.in_flight: list[tuple[int, BreakerState]] = []

    @rule()
    def admit(self):
        before = self.machine.state
        ticket = self.machine.admit()
        if before is OPEN:
            assert ticket is None, "an open breaker admitted a call"
        if ticket is not None:
            self.in_flight.append((ticket, before))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "fail", "release"]))
    def settle(self, data, outcome):
        index = data.draw(st.integers(0, len(self.in_flight) - 1))
        ticket, _ = self.in_flight.pop(index)
        {
            "ok": self.machine.succeeded,
            "fail": self.machine.failed,
            "release": self.machine.release,
        }[outcome](ticket)

    @rule(seconds=st.floats(0.0, 12.0))
    def wait(self, seconds):
        self.clock.now += seconds

    @invariant()
    def half_open_probes_are_bounded(self):
        if not hasattr(self, "machine"):
            return
        state = self.machine.state
        assert self.machine.probes_in_flight >= 0
        if state is HALF:
            current = self.machine._generation
            probes = [
                t for t, admitted_in in self.in_flight if t == current and admitted_in is HALF
            ]
            assert len(probes) == self.machine.probes_in_flight
            assert len(probes) <= self.policy.half_open_max_calls
        else:
            assert self.machine.probes_in_flight == 0


TestBreakerModel = BreakerModel.TestCase
TestBreakerModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- breaker: the async wrapper and the registry --------------------------------


async def test_open_breaker_raises_circuit_open_without_calling():
    clock = FakeClock()
    breaker = CircuitBreaker("shard:t1", failure_threshold=2, open_s=30, clock=clock)
    calls = 0

    async def boom():
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(boom)
    assert breaker.state is OPEN
    clock.now += 10
    with pytest.raises(CircuitOpen) as info:
        await breaker.call(boom)
    with pytest.raises(CircuitOpen):
        async with breaker:
            calls += 100
    assert calls == 2
    assert info.value.name == "shard:t1"
    assert "shard:t1" in str(info.value) and "20 s" in str(info.value)
    assert isinstance(info.value, ResilienceError)
    transitions = metrics.REGISTRY.get_sample_value(
        "tenfold_breaker_transitions_total", {"name": "shard:t1", "state": "open"}
    )
    assert transitions == 1
    assert metrics.REGISTRY.get_sample_value("tenfold_breaker_state", {"name": "shard:t1"}) == 2


async def test_async_with_counts_failures_and_ignores_uncounted_errors():
    clock = FakeClock()
    breaker = CircuitBreaker(
        "redis:t2",
        failure_threshold=1,
        clock=clock,
        counts_as_failure=lambda exc: isinstance(exc, ConnectionError),
    )
    with pytest.raises(KeyError):
        async with breaker:
            raise KeyError("a miss is not an outage")
    assert breaker.state is CLOSED
    async with breaker:
        pass
    with pytest.raises(ConnectionError):
        async with breaker:
            raise ConnectionError("down")
    assert breaker.state is OPEN


async def test_half_open_lets_only_the_allowed_probes_through_concurrently():
    clock = FakeClock()
    breaker = CircuitBreaker("shard:t3", failure_threshold=1, open_s=1, clock=clock)
    with pytest.raises(ConnectionError):
        async with breaker:
            raise ConnectionError
    clock.now += 1
    gate = asyncio.Event()
    started = 0

    async def probe():
        nonlocal started
        started += 1
        await gate.wait()
        return "ok"

    tasks = [asyncio.create_task(breaker.call(probe)) for _ in range(5)]
    await asyncio.sleep(0)
    assert started == 1
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 1
    assert sum(isinstance(r, CircuitOpen) for r in results) == 4
    assert breaker.state is CLOSED


async def test_cancelled_probe_frees_its_slot():
    clock = FakeClock()
    breaker = CircuitBreaker("shard:t4", failure_threshold=1, open_s=1, clock=clock)
    with pytest.raises(ConnectionError):
        await breaker.call(_raise, ConnectionError())
    clock.now += 1
    task = asyncio.create_task(breaker.call(asyncio.sleep, 10))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is HALF
    assert await breaker.call(_value, 7) == 7
    assert breaker.state is CLOSED


async def _raise(exc: BaseException) -> None:
    raise exc


async def _value(x: int) -> int:
    return x


def test_registry_gives_one_breaker_per_name():
    registry = BreakerRegistry(open_s=5)
    redis = registry.get("redis")
    assert registry.get("redis") is redis
    assert registry.get("shard:s3") is not redis
    assert registry.names() == ["redis", "shard:s3"]
    assert "redis" in registry
    assert redis.machine.policy.open_s == 5
    assert registry.get("redis", open_s=5) is redis
    with pytest.raises(ConfigError):
        registry.get("redis", open_s=60)


# -- bulkhead ------------------------------------------------------------------


async def test_bulkhead_bounds_concurrency_under_100_tasks():
    bulkhead = Bulkhead("bh:t1", max_concurrent=7, max_wait_s=5.0)
    inside = peak = 0

    async def work(i):
        nonlocal inside, peak
        async with bulkhead:
            inside += 1
            peak = max(peak, inside)
            assert bulkhead.in_use <= 7
            for _ in range(i % 4 + 1):
                await asyncio.sleep(0)
            inside -= 1
        return i

    results = await asyncio.gather(*(work(i) for i in range(100)))
    assert results == list(range(100))
    assert peak == 7
    assert bulkhead.in_use == 0
    assert metrics.REGISTRY.get_sample_value("tenfold_bulkhead_in_use", {"name": "bh:t1"}) == 0


async def test_waiters_beyond_max_wait_get_bulkhead_full():
    bulkhead = Bulkhead("bh:t2", max_concurrent=2, max_wait_s=0.05)
    release = asyncio.Event()

    async def hold():
        async with bulkhead:
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    results = await asyncio.gather(*(hold() for _ in range(10)), return_exceptions=True)
    waited = loop.time() - start
    assert all(isinstance(r, BulkheadFull) for r in results)
    assert waited < 1.0
    assert "bh:t2" in str(results[0]) and "0.05 s" in str(results[0])
    assert bulkhead.waiting == 0 and bulkhead.in_use == 2
    rejected = metrics.REGISTRY.get_sample_value(
        "tenfold_bulkhead_rejections_total", {"name": "bh:t2"}
    )
    assert rejected == 10
    release.set()
    await asyncio.gather(*holders)
    assert bulkhead.in_use == 0


async def test_bulkhead_without_wait_or_waiting_room_refuses_at_once():
    no_wait = Bulkhead("bh:t3", max_concurrent=1, max_wait_s=0)
    no_room = Bulkhead("bh:t4", max_concurrent=1, max_wait_s=10, max_waiting=0)
    for bulkhead in (no_wait, no_room):
        async with bulkhead:
            with pytest.raises(BulkheadFull):
                await bulkhead.acquire()
        async with bulkhead:  # the slot came back
            pass


async def test_bulkhead_slot_is_returned_on_error_and_cancellation():
    bulkhead = Bulkhead("bh:t5", max_concurrent=1, max_wait_s=1.0)
    with pytest.raises(RuntimeError):
        async with bulkhead:
            raise RuntimeError
    assert bulkhead.in_use == 0

    async def sleeper():
        async with bulkhead:
            await asyncio.sleep(10)

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(bulkhead.acquire())
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    waiter.cancel()
    task.cancel()
    await asyncio.gather(task, waiter, return_exceptions=True)
    assert bulkhead.in_use == 0 and bulkhead.waiting == 0
    async with bulkhead:
        assert bulkhead.in_use == 1


@pytest.mark.parametrize(
    "args", [{"max_concurrent": 0, "max_wait_s": 1}, {"max_concurrent": 1, "max_wait_s": -1}]
)
def test_bulkhead_settings_are_validated(args):
    with pytest.raises(ConfigError):
        Bulkhead("bh:bad", **args)


# -- retry ---------------------------------------------------------------------


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def flaky(failures: list[BaseException], result: str = "done"):
    calls = []

    async def fn():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return fn, calls


async def test_retries_listed_errors_until_success():
    sleep = FakeSleep()
    fn, calls = flaky([ConnectionError("reset"), ShardUnavailable("s1", "sqlite://x", "busy")])
    assert await retry_idempotent(fn, attempts=3, sleep=sleep, what="t:ok") == "done"
    assert len(calls) == 3 and len(sleep.delays) == 2
    assert metrics.REGISTRY.get_sample_value("tenfold_retries_total", {"what": "t:ok"}) == 2


async def test_stops_at_the_bound_and_reraises_the_last_error():
    sleep = FakeSleep()
    errors: list[BaseException] = [ConnectionError(f"try {i}") for i in range(10)]
    fn, calls = flaky(errors)
    with pytest.raises(ConnectionError, match="try 3"):
        await retry_idempotent(fn, attempts=4, sleep=sleep)
    assert len(calls) == 4 and len(sleep.delays) == 3


@pytest.mark.parametrize(
    "error", [ValueError("bad input"), ConstraintViolation("s1", "unique"), CircuitOpen("x", 1)]
)
async def test_errors_not_listed_are_not_retried(error):
    sleep = FakeSleep()
    fn, calls = flaky([error])
    with pytest.raises(type(error)):
        await retry_idempotent(fn, attempts=5, sleep=sleep)
    assert len(calls) == 1 and sleep.delays == []


async def test_only_the_given_retry_on_types_are_retried():
    sleep = FakeSleep()
    fn, calls = flaky([KeyError("a"), ConnectionError("not listed here")])
    with pytest.raises(ConnectionError):
        await retry_idempotent(fn, attempts=5, retry_on=(KeyError,), sleep=sleep)
    assert len(calls) == 2


@pytest.mark.parametrize("seed", range(5))
async def test_delays_are_full_jitter_within_the_capped_exponential(seed):
    random.seed(seed)
    sleep = FakeSleep()
    fn, _ = flaky([TimeoutError() for _ in range(20)])
    with pytest.raises(TimeoutError):
        await retry_idempotent(fn, attempts=9, initial_s=0.1, max_s=1.0, sleep=sleep)
    assert len(sleep.delays) == 8
    for k, delay in enumerate(sleep.delays, start=1):
        assert 0.0 <= delay <= min(1.0, 0.1 * 2 ** (k - 1)) + 1e-12
    assert len(set(sleep.delays)) > 1  # jittered, not a fixed schedule


async def test_decorator_form_retries_with_arguments():
    sleep = FakeSleep()
    failures: list[BaseException] = [ConnectionError()]
    seen = []

    @idempotent(attempts=2, sleep=sleep)
    async def read(key: str, *, shard: str) -> str:
        seen.append((key, shard))
        if failures:
            raise failures.pop()
        return f"{shard}/{key}"

    assert await read("k", shard="s1") == "s1/k"
    assert seen == [("k", "s1"), ("k", "s1")]
    assert read.__name__ == "read"


@pytest.mark.parametrize(
    "bad", [{"attempts": 0}, {"initial_s": 0}, {"max_s": 0.01, "initial_s": 0.1}]
)
async def test_retry_bounds_are_validated(bad):
    fn, calls = flaky([])
    with pytest.raises(ConfigError):
        await retry_idempotent(fn, **bad)
    with pytest.raises(ConfigError):
        idempotent(**bad)
    assert calls == []


# -- deadline ------------------------------------------------------------------


async def test_deadline_raises_typed_error_naming_what():
    with pytest.raises(DeadlineExceeded) as info:
        async with deadline(0.01, what="query on shard s3"):
            await asyncio.sleep(10)
    assert info.value.what == "query on shard s3"
    assert "query on shard s3" in str(info.value) and "0.01 s" in str(info.value)
    assert isinstance(info.value, TimeoutError)


async def test_deadline_lets_fast_bodies_and_foreign_timeouts_through():
    async with deadline(5, what="fast"):
        await asyncio.sleep(0)
    with pytest.raises(TimeoutError) as info:
        async with deadline(5, what="outer"):
            raise TimeoutError("from the driver")
    assert not isinstance(info.value, DeadlineExceeded)


async def test_nested_deadlines_report_the_one_that_fired():
    with pytest.raises(DeadlineExceeded) as info:
        async with deadline(5, what="request"), deadline(0.01, what="cache read"):
            await asyncio.sleep(10)
    assert info.value.what == "cache read"


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan")])
async def test_deadline_seconds_are_validated(seconds):
    with pytest.raises(ConfigError):
        async with deadline(seconds, what="x"):
            pass


# -- bulkhead: a stalled bulkhead refuses at once -------------------------------


async def test_stalled_bulkhead_refuses_at_once_instead_of_parking_callers():
    clock = FakeClock()
    bulkhead = Bulkhead(
        "bh:stall", max_concurrent=2, max_wait_s=5.0, stall_after_s=0.5, clock=clock
    )
    await bulkhead.acquire()
    await bulkhead.acquire()  # full now: the stall clock starts
    assert bulkhead.stalled_for_s() == 0.0 and not bulkhead.stalled()

    clock.now += 0.4  # full but recently filled: a caller still waits for a slot
    waiter = asyncio.create_task(bulkhead.acquire())
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    bulkhead.release()  # progress: the waiter gets the slot, the clock restarts
    await waiter
    assert bulkhead.in_use == 2

    clock.now += 0.6  # no slot freed for 0.6 s >= stall_after_s: stalled
    assert bulkhead.stalled() and bulkhead.stalled_for_s() == pytest.approx(0.6)
    with pytest.raises(BulkheadFull):
        await asyncio.wait_for(bulkhead.acquire(), 0.1)  # refused at once, not after 5 s
    assert bulkhead.waiting == 0

    bulkhead.release()  # a slot frees: no longer full, no longer stalled
    assert not bulkhead.stalled() and bulkhead.stalled_for_s() == 0.0
    await bulkhead.acquire()
    assert bulkhead.in_use == 2


def test_stall_after_s_is_validated():
    with pytest.raises(ConfigError, match="stall_after_s"):
        Bulkhead("bh:bad", max_concurrent=1, max_wait_s=1.0, stall_after_s=0)


async def test_breaker_admit_and_settle_by_ticket_and_report_transitions():
    clock = FakeClock()
    seen: list[BreakerState] = []
    breaker = CircuitBreaker(
        "shard:tk", failure_threshold=2, open_s=1.0, clock=clock, on_transition=seen.append
    )
    first, second = breaker.admit(), breaker.admit()
    breaker.settle(first, RuntimeError("down"))
    breaker.settle(second, RuntimeError("down"))
    assert breaker.state is OPEN and seen == [OPEN]
    assert breaker.retry_in_s() == pytest.approx(1.0)
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 1.0
    probe = breaker.admit()
    breaker.settle(probe, None)
    assert breaker.state is CLOSED and seen == [OPEN, HALF, CLOSED]


async def test_a_freed_slot_goes_to_the_longest_waiter_not_a_newcomer():
    bulkhead = Bulkhead("bh:fifo", max_concurrent=1, max_wait_s=5.0)
    assert bulkhead.try_acquire()
    assert not bulkhead.try_acquire()  # full: the hot path says so without waiting
    order: list[str] = []

    async def waiter(name: str) -> None:
        await bulkhead.acquire()
        order.append(name)
        await asyncio.sleep(0)
        bulkhead.release()

    first = asyncio.create_task(waiter("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0)
    bulkhead.release()  # handed to "first" at once: a newcomer cannot take it
    assert not bulkhead.try_acquire()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert bulkhead.in_use == 0 and bulkhead.waiting == 0
    assert metrics.REGISTRY.get_sample_value("tenfold_bulkhead_in_use", {"name": "bh:fifo"}) == 0


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on():
    bulkhead = Bulkhead("bh:handoff", max_concurrent=1, max_wait_s=5.0)
    await bulkhead.acquire()
    doomed = asyncio.create_task(bulkhead.acquire())
    await asyncio.sleep(0)
    bulkhead.release()  # the slot goes to `doomed`...
    doomed.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert bulkhead.in_use == 0  # given back, not leaked
    await asyncio.wait_for(bulkhead.acquire(), 1)
