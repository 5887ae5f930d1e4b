"""Adaptive admission control: an AIMD concurrency limit that sheds before latency collapses.

Two parts, as in Netflix's concurrency-limits:

* `AimdLimit`, the policy: pure code over an injected clock, no I/O. Latency
  samples are grouped in short windows; each closed window is compared with a
  baseline, the minimum window mean over the last `baseline_windows` windows
  (the no-queueing RTT)::

      window mean > tolerance * baseline, or a drop  ->  limit *= backoff_ratio
      else, if the limit was in use (in_flight >= limit / 2)  ->  limit += 1
      limit stays within [min_limit, max_limit]

* `AdmissionController`, the gate: ``async with controller.admit("user"):``
  admits while in-flight < limit * share(priority), so anonymous traffic is
  shed first and critical traffic (health checks) may use the whole limit.
  A shed request raises `Overloaded` carrying `retry_after_s`, which the
  gateway maps to 503 + Retry-After. On exit the latency is fed back.

Invariants (tests/unit/test_admission.py checks them):

1. `min_limit <= limit <= max_limit` after any sequence of samples.
2. A request of priority p is admitted only while in_flight < max(1,
   floor(limit * share(p))); in_flight never exceeds the limit.
3. Each admitted request releases its slot exactly once, whether the body
   returns, raises or is cancelled; in_flight and the gauge always agree.
4. At most `max_queue` callers wait, each at most `max_wait_s`, and a freed
   slot goes to the highest-priority waiter first.
5. `step_aside()` inside an admitted request releases its slot at once and
   exactly once; the request then feeds no latency sample (its time is spent
   under another bound, e.g. the password hasher's bulkhead and queue).

Why `step_aside`: a login waits for its turn at argon2 (CPU-bound, a few at
a time) while holding an admission slot, and its seconds of queueing read as
congestion: 40 logins at once filled the budget and shrank the limit, and 34
were shed with 503 while the hasher would have served them all within its own
bounded wait.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Protocol

from tenfold.errors import ConfigError, Overloaded, ResilienceError
from tenfold.observe import metrics

__all__ = [
    "DEFAULT_PRIORITIES",
    "AdmissionController",
    "AimdLimit",
    "LimitAlgorithm",
    "step_aside",
]

DEFAULT_PRIORITIES: Mapping[str, float] = {"critical": 1.0, "user": 0.9, "anonymous": 0.6}


class LimitAlgorithm(Protocol):
    """A concurrency limit that learns from latency samples."""

    @property
    def limit(self) -> int:
        """The current limit (>= 1)."""
        ...

    def on_sample(self, rtt_s: float, in_flight: int, *, dropped: bool = False) -> None:
        """Record one finished request: its latency and the in-flight count when it started."""
        ...


class AimdLimit:
    """Additive-increase, multiplicative-decrease limit driven by windowed latency.

    Args:
        clock: monotonic seconds, e.g. `time.monotonic`; injected for tests.
        initial_limit: the limit before any sample; start low and let it grow.
        min_limit: the limit never falls below this.
        max_limit: the limit never rises above this.
        backoff_ratio: factor applied on congestion (0 < ratio < 1).
        tolerance: a window mean above `tolerance * baseline` counts as
            congestion. 1.25 rather than Gradient2's 1.5: we favour p99 over
            throughput, and 1.5 lets a third of a service round queue up.
        window_s: shortest window; a window closes after this long and
            `min_window_samples` samples.
        min_window_samples: fewest samples for a window to count.
        baseline_windows: how many window means the baseline remembers, so a
            service that became slower for good is re-learned.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        initial_limit: int = 10,
        min_limit: int = 1,
        max_limit: int = 1000,
        backoff_ratio: float = 0.9,
        tolerance: float = 1.25,
        window_s: float = 0.1,
        min_window_samples: int = 10,
        baseline_windows: int = 100,
    ) -> None:
        if not 1 <= min_limit <= initial_limit <= max_limit:
            raise ConfigError(
                "aimd limit: min_limit <= initial_limit <= max_limit",
                f"must hold with min_limit >= 1, got {min_limit}, {initial_limit}, {max_limit}",
            )
        if not 0 < backoff_ratio < 1:
            raise ConfigError(
                "aimd limit: backoff_ratio", f"must be in (0, 1), got {backoff_ratio}"
            )
        if not (math.isfinite(tolerance) and tolerance > 1):
            raise ConfigError(
                "aimd limit: tolerance", f"must be a finite number > 1, got {tolerance}"
            )
        if not (math.isfinite(window_s) and window_s > 0):
            raise ConfigError(
                "aimd limit: window_s", f"must be a finite number > 0, got {window_s}"
            )
        if min_window_samples < 1 or baseline_windows < 1:
            raise ConfigError(
                "aimd limit: min_window_samples, baseline_windows",
                f"must be >= 1, got {min_window_samples}, {baseline_windows}",
            )
        self._clock = clock
        self._limit = float(initial_limit)
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.backoff_ratio = backoff_ratio
        self.tolerance = tolerance
        self.window_s = window_s
        self.min_window_samples = min_window_samples
        self._means: deque[float] = deque(maxlen=baseline_windows)
        self._window_start = clock()
        self._sum = 0.0
        self._count = 0
        self._drops = 0
        self._max_in_flight = 0

    @property
    def limit(self) -> int:
        """The current limit."""
        return int(self._limit)

    @property
    def baseline_s(self) -> float | None:
        """The no-queueing latency estimate, or None before the first window."""
        return min(self._means) if self._means else None

    def on_sample(self, rtt_s: float, in_flight: int, *, dropped: bool = False) -> None:
        """Record one finished request; may close the window and move the limit.

        Args:
            rtt_s: the request's latency in seconds.
            in_flight: requests in flight when it was admitted (itself included).
            dropped: it timed out or was refused downstream (a congestion signal).
        """
        if dropped:
            self._drops += 1
        else:
            self._sum += rtt_s
            self._count += 1
        self._max_in_flight = max(self._max_in_flight, in_flight)
        now = self._clock()
        if now - self._window_start < self.window_s:
            return
        if self._drops == 0 and self._count < self.min_window_samples:
            return
        self._close_window(now)

    def _close_window(self, now: float) -> None:
        mean = self._sum / self._count if self._count else None
        baseline = self.baseline_s
        congested = self._drops > 0 or (
            mean is not None and baseline is not None and mean > self.tolerance * baseline
        )
        if congested:
            self._limit = max(float(self.min_limit), self._limit * self.backoff_ratio)
        elif self._max_in_flight * 2 >= self._limit:
            # Grow only when the limit was in use: an idle service proves nothing.
            self._limit = min(float(self.max_limit), self._limit + 1)
        if mean is not None:
            self._means.append(mean)
        self._window_start = now
        self._sum = 0.0
        self._count = 0
        self._drops = 0
        self._max_in_flight = 0


class AdmissionController:
    """Admits requests under an adaptive limit, shedding low priorities first.

    Args:
        limit_algorithm: the policy, e.g. `AimdLimit(clock=time.monotonic)`.
        priorities: priority class -> share of the limit it may fill (0 < share <= 1).
        max_queue: callers allowed to wait for a slot at once; 0 sheds at once.
        max_wait_s: longest wait in the queue before being shed.
        retry_after_s: the Retry-After a shed request carries (> 0).
        clock: monotonic seconds used to time requests.
    """

    def __init__(
        self,
        limit_algorithm: LimitAlgorithm,
        *,
        priorities: Mapping[str, float] = DEFAULT_PRIORITIES,
        max_queue: int = 0,
        max_wait_s: float = 0.05,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not priorities:
            raise ConfigError("admission: priorities", "must name at least one priority class")
        for name, share in priorities.items():
            if not (math.isfinite(share) and 0 < share <= 1):
                raise ConfigError(
                    f"admission: priorities[{name!r}]", f"must be in (0, 1], got {share}"
                )
        if max_queue < 0:
            raise ConfigError("admission: max_queue", f"must be >= 0, got {max_queue}")
        if not (math.isfinite(max_wait_s) and max_wait_s >= 0):
            raise ConfigError(
                "admission: max_wait_s", f"must be a finite number >= 0, got {max_wait_s}"
            )
        if not (math.isfinite(retry_after_s) and retry_after_s > 0):
            raise ConfigError(
                "admission: retry_after_s", f"must be a finite number > 0, got {retry_after_s}"
            )
        self._algorithm = limit_algorithm
        self._shares = dict(priorities)
        # Rank 0 is served first: the largest share is the most important class.
        ordered = sorted(self._shares, key=lambda p: -self._shares[p])
        self._rank = {p: i for i, p in enumerate(ordered)}
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self._clock = clock or time.monotonic
        self._in_flight = 0
        self._allowed_at = -1  # the limit `_allowed_by` was computed for
        self._allowed_by: dict[str, int] = {}
        # A heap, best first; entries whose future is done (timed out, cancelled)
        # are dropped when they reach the top.
        self._waiters: list[tuple[int, int, str, asyncio.Future[None]]] = []
        self._queued = 0  # live waiters
        self._seq = itertools.count()
        # Read when scraped, not written per request (the newest controller reports).
        me = weakref.ref(self)
        metrics.admission_in_flight.set_function(lambda: _read(me, "in_flight"))
        metrics.admission_limit.set_function(lambda: _read(me, "limit"))

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return self._in_flight

    @property
    def limit(self) -> int:
        """The algorithm's current limit."""
        return self._algorithm.limit

    def _allowed(self, priority: str) -> int:
        limit = self._algorithm.limit
        if limit != self._allowed_at:  # the shares' slots, recomputed when the limit moves
            self._allowed_at = limit
            self._allowed_by = {p: max(1, math.floor(limit * s)) for p, s in self._shares.items()}
        return self._allowed_by[priority]

    def _take_at_once(self, priority: str) -> bool:
        """The common case, without a coroutine: a known class and a free slot
        (the caller checked that nobody waits). Anything else goes to `_acquire`."""
        if priority in self._shares and self._in_flight < self._allowed(priority):
            self._in_flight += 1
            return True
        return False

    def _shed(self, priority: str) -> Overloaded:
        metrics.admission_shed.labels(priority).inc()
        return Overloaded(priority, self._algorithm.limit, self._in_flight, self.retry_after_s)

    def _take(self) -> None:
        self._in_flight += 1

    def _head(self) -> tuple[int, int, str, asyncio.Future[None]] | None:
        waiters = self._waiters
        while waiters and waiters[0][3].done():
            heapq.heappop(waiters)
        return waiters[0] if waiters else None

    async def _acquire(self, priority: str) -> None:
        if priority not in self._shares:
            raise ConfigError(
                "admission: priority", f"unknown class {priority!r}; known: {sorted(self._shares)}"
            )
        rank = self._rank[priority]
        head = self._head() if self._queued else None
        ahead = head is not None and head[0] <= rank  # no barging past them
        if not ahead and self._in_flight < self._allowed(priority):
            self._take()
            return
        if self._queued >= self.max_queue:
            raise self._shed(priority)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._waiters, (rank, next(self._seq), priority, future))
        self._queued += 1
        # One timer handle, not asyncio.timeout: whichever of it and `_wake` acts
        # first settles the future, so a slot is never granted to a shed waiter.
        timer = loop.call_later(self.max_wait_s, _expire, future)
        try:
            await future  # _wake takes the slot for us before resolving it
        except TimeoutError:
            raise self._shed(priority) from None
        except asyncio.CancelledError:
            if _granted(future):
                self._release()  # handed a slot, but the caller left: give it back
            raise
        finally:
            timer.cancel()
            self._queued -= 1

    def _wake(self) -> None:
        # Hand freed slots to the best waiters; a larger share ranks first, so once
        # the best one's share is full, every later one's is too.
        while self._queued:
            head = self._head()
            if head is None or self._in_flight >= self._allowed(head[2]):
                return
            heapq.heappop(self._waiters)
            self._take()
            head[3].set_result(None)

    def _release(self) -> None:
        self._in_flight -= 1
        if self._queued:
            self._wake()

    def admit(self, priority: str) -> _Admission:
        """`async with admit(priority):` runs the body if admitted; feeds its latency back.

        Args:
            priority: a class named in `priorities`, e.g. "critical", "user", "anonymous".

        Raises:
            Overloaded: the request was shed; answer 503 with `retry_after_s`.
            ConfigError: `priority` is not a known class.
        """
        return _Admission(self, priority)


def step_aside() -> None:
    """Give the running request's admission slot back now (invariant 5).

    For work bounded by its own bulkhead, with its own queue and wait bound,
    such as password hashing: its wait is not this process's congestion, and
    the slot it would hold is better used by another request. A no-op outside
    an admitted request (admission switched off, a background task).
    """
    admission = _admitted.get()
    if admission is not None:
        admission.step_aside()


class _Admission:
    # A plain class, not @asynccontextmanager: every request enters one, and a
    # generator-based context manager costs a generator and two extra frames.
    __slots__ = ("_aside", "_controller", "_in_flight", "_priority", "_start", "_token")

    def __init__(self, controller: AdmissionController, priority: str) -> None:
        self._controller = controller
        self._priority = priority
        self._aside = False

    async def __aenter__(self) -> None:
        c = self._controller
        if c._queued or not c._take_at_once(self._priority):
            await c._acquire(self._priority)
        self._in_flight = c._in_flight
        self._start = c._clock()
        self._token = _admitted.set(self)

    def step_aside(self) -> None:
        if not self._aside:
            self._aside = True
            self._controller._release()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        c = self._controller
        _admitted.reset(self._token)
        if self._aside:
            return  # released when it stepped aside; its latency is not ours to learn from
        try:
            if exc_type is None or not issubclass(exc_type, asyncio.CancelledError):
                # a cancelled caller left: its latency says nothing
                dropped = exc_type is not None and issubclass(
                    exc_type, TimeoutError | ResilienceError
                )
                c._algorithm.on_sample(c._clock() - self._start, self._in_flight, dropped=dropped)
        finally:
            c._release()


# The admission the running request holds (set in the request's own task).
_admitted: ContextVar[_Admission | None] = ContextVar("tenfold_admission", default=None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _read(ref: weakref.ref[AdmissionController], what: str) -> float:
    controller = ref()
    if controller is None:
        return 0.0
    return float(controller.in_flight if what == "in_flight" else controller.limit)


def _granted(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled()
