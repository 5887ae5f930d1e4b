"""Admission control: the AIMD limit, priority shedding, load shedding in simulation."""

from __future__ import annotations

import asyncio
import random
import selectors
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenfold.errors import ConfigError, DeadlineExceeded, Overloaded
from tenfold.limits import AdmissionController, AimdLimit
from tenfold.observe import metrics

T = TypeVar("T")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FixedLimit:
    """A limit that never moves, recording what it is told."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.samples: list[tuple[float, int, bool]] = []

    def on_sample(self, rtt_s: float, in_flight: int, *, dropped: bool = False) -> None:
        self.samples.append((rtt_s, in_flight, dropped))


def feed_window(
    algo: AimdLimit, clock: FakeClock, rtt_s: float, *, in_flight: int | None = None, n: int = 10
) -> int:
    """Feed one full window of samples, then return the limit."""
    for _ in range(n - 1):
        algo.on_sample(rtt_s, algo.limit if in_flight is None else in_flight)
    clock.now += algo.window_s
    algo.on_sample(rtt_s, algo.limit if in_flight is None else in_flight)
    return algo.limit


# -- the algorithm, with a fake clock --------------------------------------------------


def test_limit_grows_additively_under_stable_latency() -> None:
    clock = FakeClock()
    algo = AimdLimit(clock=clock, initial_limit=10, window_s=0.1)
    limits = [feed_window(algo, clock, 0.010) for _ in range(5)]
    assert limits == [11, 12, 13, 14, 15]
    assert algo.baseline_s == pytest.approx(0.010)


def test_limit_shrinks_multiplicatively_when_latency_doubles() -> None:
    clock = FakeClock()
    algo = AimdLimit(clock=clock, initial_limit=50, window_s=0.1, backoff_ratio=0.9)
    for _ in range(5):
        feed_window(algo, clock, 0.010)
    assert algo.limit == 55
    limits = [feed_window(algo, clock, 0.020) for _ in range(3)]
    assert limits == [49, 44, 40]  # 55 * 0.9 ** k, truncated
    # Back near the baseline, it grows again.
    assert feed_window(algo, clock, 0.011) == 41


def test_latency_within_tolerance_is_not_congestion() -> None:
    clock = FakeClock()
    algo = AimdLimit(clock=clock, initial_limit=10, tolerance=1.25)
    feed_window(algo, clock, 0.010)
    assert feed_window(algo, clock, 0.012) == 12


def test_drops_cut_the_limit_even_without_latency_samples() -> None:
    clock = FakeClock()
    algo = AimdLimit(clock=clock, initial_limit=20)
    clock.now += algo.window_s
    algo.on_sample(5.0, 20, dropped=True)
    assert algo.limit == 18
    assert algo.baseline_s is None  # a drop's latency is not a baseline


def test_idle_service_does_not_grow_the_limit() -> None:
    clock = FakeClock()
    algo = AimdLimit(clock=clock, initial_limit=20)
    assert [feed_window(algo, clock, 0.010, in_flight=2) for _ in range(3)] == [20, 20, 20]


def test_window_needs_time_and_samples() -> None:
    clock = FakeClock()
    algo = AimdLimit(clock=clock, initial_limit=10, window_s=0.1, min_window_samples=10)
    for _ in range(50):
        algo.on_sample(0.01, 10)  # many samples, no time: no window closes
    assert algo.limit == 10
    clock.now += 1.0
    feed_window(algo, clock, 0.01, n=1)
    assert algo.limit == 11


@given(
    st.lists(
        st.tuples(st.floats(0.001, 1.0), st.integers(0, 200), st.booleans(), st.floats(0, 0.3)),
        max_size=200,
    )
)
def test_limit_stays_within_bounds(samples: list[tuple[float, int, bool, float]]) -> None:
    clock = FakeClock()
    algo = AimdLimit(clock=clock, initial_limit=5, min_limit=3, max_limit=12, min_window_samples=2)
    for rtt_s, in_flight, dropped, advance_s in samples:
        clock.now += advance_s
        algo.on_sample(rtt_s, in_flight, dropped=dropped)
        assert 3 <= algo.limit <= 12


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_limit": 0},
        {"initial_limit": 5, "max_limit": 4},
        {"backoff_ratio": 1.0},
        {"tolerance": 1.0},
        {"window_s": 0.0},
        {"min_window_samples": 0},
    ],
)
def test_aimd_settings_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        AimdLimit(clock=FakeClock(), **kwargs)  # type: ignore[arg-type]


# -- the controller --------------------------------------------------------------------


async def hold(controller: AdmissionController, priority: str, release: asyncio.Event) -> None:
    async with controller.admit(priority):
        await release.wait()


async def test_saturated_limit_sheds_anonymous_first_and_admits_critical() -> None:
    controller = AdmissionController(FixedLimit(10), retry_after_s=2.0)
    release = asyncio.Event()
    held = [asyncio.create_task(hold(controller, "user", release)) for _ in range(6)]
    await asyncio.sleep(0)
    assert controller.in_flight == 6

    before = metrics.admission_shed.labels("anonymous")._value.get()
    with pytest.raises(Overloaded) as shed:  # anonymous may fill 60%: 6 of 10
        async with controller.admit("anonymous"):
            pytest.fail("anonymous admitted past its share")
    assert shed.value.retry_after_s == 2.0
    assert shed.value.priority == "anonymous"
    assert metrics.admission_shed.labels("anonymous")._value.get() == before + 1

    held += [asyncio.create_task(hold(controller, "user", release)) for _ in range(3)]
    await asyncio.sleep(0)
    assert controller.in_flight == 9  # user may fill 90%
    with pytest.raises(Overloaded):
        async with controller.admit("user"):
            pytest.fail("user admitted past its share")

    held.append(asyncio.create_task(hold(controller, "critical", release)))
    await asyncio.sleep(0)
    assert controller.in_flight == 10  # critical may fill the whole limit
    with pytest.raises(Overloaded):
        async with controller.admit("critical"):
            pytest.fail("admitted past the limit")

    release.set()
    await asyncio.gather(*held)
    assert controller.in_flight == 0
    [sample] = metrics.admission_in_flight.collect()[0].samples
    assert sample.value == 0


async def test_exit_records_latency_and_drops_and_always_releases() -> None:
    limit = FixedLimit(5)
    controller = AdmissionController(limit)
    async with controller.admit("user"):
        pass
    with pytest.raises(ValueError):
        async with controller.admit("user"):
            raise ValueError("a 4xx is not congestion")
    with pytest.raises(DeadlineExceeded):
        async with controller.admit("user"):
            raise DeadlineExceeded("query", 1.0)
    assert [dropped for _, _, dropped in limit.samples] == [False, False, True]
    assert all(in_flight == 1 for _, in_flight, _ in limit.samples)

    task = asyncio.create_task(hold(controller, "user", asyncio.Event()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(limit.samples) == 3  # a cancelled caller says nothing about latency
    assert controller.in_flight == 0


async def test_queue_hands_freed_slots_to_the_highest_priority_first() -> None:
    controller = AdmissionController(FixedLimit(1), max_queue=2, max_wait_s=5.0)
    release = asyncio.Event()
    first = asyncio.create_task(hold(controller, "critical", release))
    await asyncio.sleep(0)
    order: list[str] = []

    async def wait_then_note(priority: str) -> None:
        async with controller.admit(priority):
            order.append(priority)

    anon = asyncio.create_task(wait_then_note("anonymous"))
    await asyncio.sleep(0)
    crit = asyncio.create_task(wait_then_note("critical"))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):  # the queue is full
        async with controller.admit("user"):
            pass
    release.set()
    await asyncio.gather(first, anon, crit)
    assert order == ["critical", "anonymous"]
    assert controller.in_flight == 0


async def test_queued_caller_is_shed_after_max_wait() -> None:
    controller = AdmissionController(FixedLimit(1), max_queue=1, max_wait_s=0.01)
    release = asyncio.Event()
    first = asyncio.create_task(hold(controller, "user", release))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        async with controller.admit("user"):
            pass
    release.set()
    await first
    assert controller.in_flight == 0


async def test_controller_settings_are_validated() -> None:
    with pytest.raises(ConfigError):
        AdmissionController(FixedLimit(1), priorities={"user": 1.5})
    with pytest.raises(ConfigError):
        AdmissionController(FixedLimit(1), retry_after_s=0)
    with pytest.raises(ConfigError):
        AdmissionController(FixedLimit(1), max_queue=-1)
    with pytest.raises(ConfigError, match="unknown class 'vip'"):
        async with AdmissionController(FixedLimit(1)).admit("vip"):
            pass


# -- load shedding in simulation (the acceptance test) -------------------------
#
# The simulation runs on virtual time: `VirtualTimeLoop` jumps its clock to the next
# timer instead of waiting, so the service's sleeps, the clients' deadlines and the
# controller's latency samples are all exact and the run is the same every time
# (on the real clock this compared p99s of scheduler noise and failed ~1 run in 4).
# Speed claims are not made here: they belong in benchmarks/.

WORKERS = 8
SERVICE_S = 0.005


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real I/O without blocking; a wait for a timer advances the loop's clock."""

    def __init__(self, loop_clock: list[float]) -> None:
        super().__init__()
        self._clock = loop_clock

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready and timeout is not None and timeout > 0:
            self._clock[0] += timeout  # nothing to do until the next timer: skip to it
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` only moves when every task waits for a timer."""

    def __init__(self) -> None:
        self._virtual_now = [0.0]
        super().__init__(_VirtualSelector(self._virtual_now))

    def time(self) -> float:
        return self._virtual_now[0]


def run_virtual(main: Callable[[asyncio.AbstractEventLoop], Awaitable[T]]) -> T:
    """Run `main(loop)` to completion on a fresh `VirtualTimeLoop`."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()


class FakeService:
    """True capacity WORKERS / SERVICE_S; beyond it, requests queue for a worker."""

    def __init__(self) -> None:
        self._workers = asyncio.Semaphore(WORKERS)
        self._rng = random.Random(7)  # service times vary +-20%, like a real service

    async def call(self) -> None:
        async with self._workers:
            await asyncio.sleep(SERVICE_S * self._rng.uniform(0.8, 1.2))


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


async def drive(
    clock: Callable[[], float], clients: int, duration_s: float, call: Callable[[], Awaitable[None]]
) -> None:
    deadline = clock() + duration_s

    async def client() -> None:
        while clock() < deadline:
            await call()

    await asyncio.gather(*(client() for _ in range(clients)))


@dataclass
class Overload:
    """What one simulated run measured."""

    unloaded: list[float]
    admitted: list[float]
    shed: list[float]
    collapsed: list[float]


async def simulate_overload(loop: asyncio.AbstractEventLoop) -> Overload:
    """Half capacity unguarded, then 3x capacity behind admission control, then unguarded."""
    clock = loop.time
    service = FakeService()
    out = Overload([], [], [], [])

    async def timed(into: list[float]) -> None:
        start = clock()
        await service.call()
        into.append(clock() - start)

    await drive(clock, WORKERS // 2, 0.5, lambda: timed(out.unloaded))  # no queueing

    controller = AdmissionController(
        AimdLimit(clock=clock, initial_limit=4, window_s=0.02, min_window_samples=8),
        retry_after_s=0.5,
        clock=clock,
    )

    async def admitted_call() -> None:
        start = clock()
        try:
            async with controller.admit("user"):
                await service.call()
        except Overloaded as exc:
            out.shed.append(exc.retry_after_s)
            await asyncio.sleep(SERVICE_S)  # a shed client comes back later
            return
        out.admitted.append(clock() - start)

    await drive(clock, 3 * WORKERS, 2.5, admitted_call)  # 3x capacity
    # Without admission control the same overload does collapse latency (the test bites).
    await drive(clock, 3 * WORKERS, 0.5, lambda: timed(out.collapsed))
    return out


def test_overload_is_shed_before_latency_collapses() -> None:
    run = run_virtual(simulate_overload)
    unloaded_p99 = p99(run.unloaded)
    assert SERVICE_S * 0.8 <= unloaded_p99 <= SERVICE_S * 1.2  # virtual time: no noise
    assert run.shed and all(r > 0 for r in run.shed)
    assert p99(run.admitted) < 2 * unloaded_p99, (p99(run.admitted), unloaded_p99)
    # Not by shedding everything: well over a third of true capacity still got through.
    assert len(run.admitted) > 0.4 * 2.5 * WORKERS / SERVICE_S, len(run.admitted)
    assert p99(run.collapsed) > 2 * unloaded_p99


def test_the_overload_simulation_is_deterministic() -> None:
    first, second = run_virtual(simulate_overload), run_virtual(simulate_overload)
    assert first == second
