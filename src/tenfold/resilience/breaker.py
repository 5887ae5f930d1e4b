"""Circuit breakers, closed / open / half-open, one per dependency or shard.

The policy (`BreakerMachine`) is a pure state machine over an injected clock:
no I/O, no asyncio, testable with a fake clock. `CircuitBreaker` wraps it for
async callers (`async with breaker:` or `await breaker.call(fn, *args)`), and
`breakers.get(name)` gives one breaker per name, so "per dependency" and "per
shard" are just names: ``breakers.get("redis")``, ``breakers.get("shard:s3")``.

Flow, as in Resilience4j::

    CLOSED  --(failure_threshold consecutive failures,
               or failure_rate over the last window_calls calls)-->  OPEN
    OPEN    --(open_s elapsed)-------------------------------------> HALF_OPEN
    HALF_OPEN: up to half_open_max_calls probes in flight at once;
               half_open_max_calls successful probes --> CLOSED
               any probe failure ------------------------> OPEN (timer restarts)

Invariants (tests/unit/test_resilience.py checks them with Hypothesis):

1. While OPEN, no call is admitted: the wrapped function is never called.
2. While HALF_OPEN, at most half_open_max_calls admitted calls are in flight.
3. Every state change bumps a generation; a result is only counted if it
   belongs to the current generation, so calls admitted before a transition
   (slow calls that finish after the breaker opened) never move the new state.
4. Every admitted call is settled exactly once (success, failure or release),
   so a cancelled probe frees its half-open slot.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from tenfold.errors import CircuitOpen, ConfigError
from tenfold.observe import metrics

__all__ = [
    "BreakerMachine",
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerState",
    "CircuitBreaker",
    "breakers",
]

P = ParamSpec("P")
T = TypeVar("T")

Clock = Callable[[], float]


class BreakerState(StrEnum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_STATE_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker trips and how it recovers; validated on construction.

    Args:
        failure_threshold: consecutive failures (while closed) that open the
            breaker; None to trip on the failure rate only.
        failure_rate: fraction of failures in the last `window_calls` calls
            (once that many were seen) that opens the breaker; None to trip
            on consecutive failures only.
        window_calls: size of the sliding window of calls for `failure_rate`.
        open_s: seconds the breaker stays open before letting probes through.
        half_open_max_calls: probes allowed in flight while half-open; this
            many successful probes close the breaker.
    """

    failure_threshold: int | None = 5
    failure_rate: float | None = None
    window_calls: int = 20
    open_s: float = 30.0
    half_open_max_calls: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold is None and self.failure_rate is None:
            raise ConfigError(
                "failure_threshold", "and failure_rate are both None: set at least one"
            )
        if self.failure_threshold is not None and self.failure_threshold < 1:
            raise ConfigError("failure_threshold", f"must be >= 1, got {self.failure_threshold}")
        if self.failure_rate is not None and not 0.0 < self.failure_rate <= 1.0:
            raise ConfigError("failure_rate", f"must be in (0, 1], got {self.failure_rate}")
        if self.window_calls < 1:
            raise ConfigError("window_calls", f"must be >= 1, got {self.window_calls}")
        if not (math.isfinite(self.open_s) and self.open_s > 0):
            raise ConfigError("open_s", f"must be a finite number > 0, got {self.open_s}")
        if self.half_open_max_calls < 1:
            raise ConfigError(
                "half_open_max_calls", f"must be >= 1, got {self.half_open_max_calls}"
            )


class BreakerMachine:
    """The pure breaker policy: admit, then settle each admitted call once.

    `admit()` returns a ticket (the generation it was admitted in) or None when
    the call must not be made; the caller settles the ticket with `succeeded`,
    `failed` or `release` (neither: cancelled or not counted).

    Args:
        policy: the trip and recovery settings.
        clock: monotonic seconds; a fake in tests.
        on_transition: called with the new state after every state change.
    """

    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        clock: Clock = time.monotonic,
        on_transition: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._consecutive_failures = 0
        self._window: deque[bool] = deque(maxlen=policy.window_calls)  # True = failure
        self._probes_in_flight = 0
        self._probe_successes = 0

    @property
    def state(self) -> BreakerState:
        """The current state, moving OPEN to HALF_OPEN once open_s has passed."""
        if self._state is BreakerState.OPEN and self.retry_in_s() <= 0.0:
            self._enter(BreakerState.HALF_OPEN)
        return self._state

    @property
    def probes_in_flight(self) -> int:
        """Admitted half-open probes not yet settled."""
        return self._probes_in_flight

    def retry_in_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 if not open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.open_s - self._clock())

    def admit(self) -> int | None:
        """Admit one call: its ticket, or None if the call must not be made."""
        state = self.state
        if state is BreakerState.OPEN:
            return None
        if state is BreakerState.HALF_OPEN:
            if self._probes_in_flight >= self.policy.half_open_max_calls:
                return None
            self._probes_in_flight += 1
        return self._generation

    def succeeded(self, ticket: int) -> None:
        """Settle an admitted call that succeeded."""
        if not self._settle(ticket):
            return
        if self._state is BreakerState.HALF_OPEN:
            self._probe_successes += 1
            if self._probe_successes >= self.policy.half_open_max_calls:
                self._enter(BreakerState.CLOSED)
        else:
            self._consecutive_failures = 0
            self._window.append(False)

    def failed(self, ticket: int) -> None:
        """Settle an admitted call that failed (as `counts_as_failure` judged)."""
        if not self._settle(ticket):
            return
        if self._state is BreakerState.HALF_OPEN:
            self._enter(BreakerState.OPEN)
            return
        self._consecutive_failures += 1
        self._window.append(True)
        if self._tripped():
            self._enter(BreakerState.OPEN)

    def release(self, ticket: int) -> None:
        """Settle an admitted call without counting it (cancelled, ignored error)."""
        self._settle(ticket)

    def _settle(self, ticket: int) -> bool:
        """Free the ticket's probe slot; True if its result should be counted."""
        if ticket != self._generation:
            return False  # admitted before a transition: stale (invariant 3)
        if self._state is BreakerState.HALF_OPEN:
            self._probes_in_flight -= 1
        return self._state is not BreakerState.OPEN

    def _tripped(self) -> bool:
        policy = self.policy
        if (
            policy.failure_threshold is not None
            and self._consecutive_failures >= policy.failure_threshold
        ):
            return True
        if policy.failure_rate is not None and len(self._window) >= policy.window_calls:
            return sum(self._window) / len(self._window) >= policy.failure_rate
        return False

    def _enter(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._probes_in_flight = 0
        self._probe_successes = 0
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        if state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            self._window.clear()
        if self._on_transition is not None:
            self._on_transition(state)


def _any_exception(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


class CircuitBreaker:
    """An async circuit breaker for one dependency (`name`), over `BreakerMachine`.

    Use ``async with breaker:`` around a call, or ``await breaker.call(fn, *args)``.
    When open, both raise `CircuitOpen` without calling.

    Args:
        name: the dependency, e.g. "redis" or "shard:s3"; a metric label.
        failure_threshold: consecutive failures that open the breaker (None: off).
        failure_rate: failure fraction over the last `window_calls` calls that
            opens the breaker (None: off).
        window_calls: sliding window size for `failure_rate`.
        open_s: seconds open before half-open probes are let through.
        half_open_max_calls: probes in flight at once while half-open, and the
            successes needed to close.
        clock: monotonic seconds; a fake in tests.
        counts_as_failure: which exceptions count as failures; the others
            pass through without moving the breaker. Default: any `Exception`
            (cancellation never counts).
        on_transition: called with the new state after every state change
            (after the metrics are updated), e.g. to log it.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int | None = 5,
        failure_rate: float | None = None,
        window_calls: int = 20,
        open_s: float = 30.0,
        half_open_max_calls: int = 1,
        clock: Clock = time.monotonic,
        counts_as_failure: Callable[[BaseException], bool] = _any_exception,
        on_transition: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self._counts_as_failure = counts_as_failure
        self._on_transition = on_transition
        policy = BreakerPolicy(
            failure_threshold=failure_threshold,
            failure_rate=failure_rate,
            window_calls=window_calls,
            open_s=open_s,
            half_open_max_calls=half_open_max_calls,
        )
        self.machine = BreakerMachine(policy, clock=clock, on_transition=self._record_transition)
        # Tickets of the `async with` blocks of the current task (a stack, for
        # nesting); a ContextVar because one breaker serves many tasks at once.
        self._tickets: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar(
            f"tenfold_breaker_{name}", default=()
        )
        metrics.breaker_state.labels(name).set(_STATE_GAUGE[BreakerState.CLOSED])

    @property
    def state(self) -> BreakerState:
        """The current state."""
        return self.machine.state

    def _record_transition(self, state: BreakerState) -> None:
        metrics.breaker_state.labels(self.name).set(_STATE_GAUGE[state])
        metrics.breaker_transitions.labels(self.name, state.value).inc()
        if self._on_transition is not None:
            self._on_transition(state)

    def admit(self) -> int:
        """Admit one call and return its ticket, for callers that hold it themselves.

        `async with` keeps tickets in a ContextVar; a caller that already has
        an object per call (a pooled connection's lease) keeps the ticket there
        instead and hands it back to `settle` exactly once.

        Raises:
            CircuitOpen: the call must not be made.
        """
        return self._admit()

    def settle(self, ticket: int, exc: BaseException | None) -> None:
        """Settle an admitted call: `exc` None for success, else judged by `counts_as_failure`."""
        self._settle(ticket, exc)

    def retry_in_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 if not open)."""
        return self.machine.retry_in_s()

    def _admit(self) -> int:
        ticket = self.machine.admit()
        if ticket is None:
            raise CircuitOpen(self.name, self.machine.retry_in_s())
        return ticket

    def _settle(self, ticket: int, exc: BaseException | None) -> None:
        if exc is None:
            self.machine.succeeded(ticket)
        elif self._counts_as_failure(exc):
            self.machine.failed(ticket)
        else:
            self.machine.release(ticket)

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call `fn(*args, **kwargs)` through the breaker.

        Args:
            fn: the async function to guard.
            *args: its positional arguments.
            **kwargs: its keyword arguments.

        Raises:
            CircuitOpen: the breaker is open (or half-open with all probe slots
                taken); `fn` was not called.
        """
        ticket = self._admit()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(ticket, exc)
            raise
        self._settle(ticket, None)
        return result

    async def __aenter__(self) -> CircuitBreaker:
        ticket = self._admit()
        self._tickets.set((*self._tickets.get(), ticket))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        *rest, ticket = self._tickets.get()
        self._tickets.set(tuple(rest))
        self._settle(ticket, exc)


class BreakerRegistry:
    """One `CircuitBreaker` per name, created on first use.

    Args:
        **defaults: keyword arguments of `CircuitBreaker` used for breakers
            created without their own options.
    """

    def __init__(self, **defaults: Any) -> None:
        self._defaults = defaults
        self._breakers: dict[str, CircuitBreaker] = {}
        self._options: dict[str, dict[str, Any]] = {}

    def get(self, name: str, **options: Any) -> CircuitBreaker:
        """The breaker for `name`, created with `options` (over the defaults) if new.

        Args:
            name: the dependency or shard, e.g. "redis", "shard:s3".
            **options: `CircuitBreaker` keyword arguments; only for the first
                call, or equal to those the breaker was created with.

        Raises:
            ConfigError: the breaker exists with different options.
        """
        breaker = self._breakers.get(name)
        if breaker is None:
            merged = {**self._defaults, **options}
            breaker = CircuitBreaker(name, **merged)
            self._breakers[name] = breaker
            self._options[name] = merged
        elif options and {**self._defaults, **options} != self._options[name]:
            raise ConfigError(
                f"breakers[{name!r}]",
                f"already created with {self._options[name]}, asked again with {options}; "
                "configure a breaker once, at start-up",
            )
        return breaker

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def names(self) -> list[str]:
        """Names of the breakers created so far, sorted."""
        return sorted(self._breakers)


breakers = BreakerRegistry()
"""The process-wide registry: ``breakers.get("redis")``, ``breakers.get("shard:s3")``."""
