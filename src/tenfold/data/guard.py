"""`ShardGuard`: one circuit breaker and one bulkhead per shard database, per process.

    lease ─▶ breaker.admit ─▶ bulkhead.acquire ─▶ pool.acquire ─▶ ... ─▶ release ─▶ settle
              │ open: ShardUnavailable    │ full (or stalled): ShardBusy
              │ at once, Retry-After      │ at once, or after max_wait_s

Both come from `tenfold.resilience`; this module only decides what they mean
for a shard:

- A dead shard (refused or timed-out connects, lost connections, statements
  past their deadline) opens its breaker after `failures` consecutive faults:
  its requests then fail in microseconds with `ShardUnavailable` carrying
  `retry_after_s`, and after `open_s` one probe is let through.
- A stalled shard (locks held for seconds) can hold at most `max_concurrent`
  leases, the requests that hold them until their statement deadline. Others
  wait at most `max_wait_s`, and none at all once the bulkhead has freed no
  slot for `stall_after_s`: they fail with `ShardBusy`. So a slow shard ties up
  a bounded number of the process's requests, never the admission budget that
  the healthy shards' requests need.
- Either is logged once per `log_every_s` per shard, naming the shard.
- A request that a shard fault ended (refused, busy, unreachable, past its
  deadline) steps aside from admission control (`limits.admission.step_aside`):
  its latency measures the bad shard, not this process's congestion, and fed
  to the adaptive limit it shrank the budget that the healthy shards' requests
  need (1.3% of them shed during a stall in benchmarks/shard_outage.py).

Invariants:
1. Every admitted breaker ticket is settled exactly once: on a refused
   bulkhead slot (uncounted), a failed acquire, or the lease's end.
2. Every bulkhead slot taken is released exactly once, whatever the body does
   (returns, raises, is cancelled), and only after the connection went back.
3. Only faults of this shard count against its breaker: `ShardUnavailable` or
   `ShardTimeout` naming this shard that the shard itself caused (not a
   `ShardBusy`, not a breaker refusal, and not another shard's error passing
   through a lease of this one). A constraint violation or a bad query is the
   caller's fault and never moves the breaker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from tenfold.data.base import Connection, Pool
from tenfold.errors import (
    BulkheadFull,
    ShardBusy,
    ShardTimeout,
    ShardUnavailable,
    SlotMoved,
)
from tenfold.limits.admission import step_aside
from tenfold.resilience import BreakerState, Bulkhead, CircuitBreaker

__all__ = ["GuardOptions", "Guarded", "ShardGuard"]

log = logging.getLogger("tenfold.data")


class GuardOptions:
    """The bounds of every shard's guard (see `Settings.shard_*`)."""

    __slots__ = (
        "failures",
        "log_every_s",
        "max_concurrent",
        "max_wait_s",
        "max_waiting",
        "open_s",
        "stall_after_s",
    )

    def __init__(
        self,
        *,
        max_concurrent: int = 4,
        max_wait_s: float = 0.5,
        max_waiting: int = 64,
        failures: int = 5,
        open_s: float = 1.0,
        stall_after_s: float = 0.25,
        log_every_s: float = 10.0,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self.failures = failures
        self.open_s = open_s
        self.stall_after_s = stall_after_s
        self.log_every_s = log_every_s


class ShardGuard:
    """The breaker and the bulkhead of one shard database (a primary or a replica).

    Args:
        name: the shard (or "s1/replica0"); names the metrics ("shard:<name>").
        safe_url: the URL without its password, for `ShardUnavailable`.
        options: the bounds.
        clock: monotonic seconds; a fake in tests.
    """

    def __init__(
        self,
        name: str,
        safe_url: str,
        options: GuardOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.safe_url = safe_url
        self.options = options
        # Set by the router: a write refused because its slot moved off this shard.
        self.on_moved: Callable[[], None] | None = None
        self._clock = clock
        self._logged_at: dict[str, float] = {}
        self.breaker = CircuitBreaker(
            f"shard:{name}",
            failure_threshold=options.failures,
            open_s=options.open_s,
            clock=clock,
            counts_as_failure=self._is_fault,
            on_transition=self._transitioned,
        )
        self._machine = self.breaker.machine
        wait = options.max_wait_s
        self.bulkhead = Bulkhead(
            f"shard:{name}",
            options.max_concurrent,
            wait,
            max_waiting=options.max_waiting,
            # A full shard that freed nothing for stall_after_s is stalled (a
            # healthy one frees a lease every few milliseconds): its waiters
            # leave and new callers are refused, so that a hung shard holds
            # max_concurrent requests, not max_concurrent + max_waiting.
            stall_after_s=min(wait, options.stall_after_s) if wait > 0 else None,
            clock=clock,
        )

    # -- the two halves of a lease ------------------------------------------

    def admit(self) -> int:
        """A breaker ticket, or `ShardUnavailable` at once while the breaker is open."""
        # The machine directly, not CircuitBreaker.admit: three calls fewer on
        # every lease, and no CircuitOpen built only to be translated.
        ticket = self._machine.admit()
        if ticket is None:
            step_aside()
            retry_in_s = self._machine.retry_in_s()
            raise ShardUnavailable(
                self.name,
                self.safe_url,
                f"failing fast: its circuit breaker is open after repeated failures "
                f"(next probe in {retry_in_s:.2g} s)",
                retry_after_s=max(retry_in_s, 0.001),
            )
        return ticket

    async def enter(self, ticket: int) -> None:
        """Take a bulkhead slot for an admitted ticket; `ShardBusy` when none frees in time."""
        bulkhead = self.bulkhead
        try:
            await bulkhead.acquire()
        except BulkheadFull:
            self.breaker.settle(ticket, _NOT_RUN)
            step_aside()
            if bulkhead.stalled():
                self._warn(
                    "stalled",
                    "shard %s stalled: all %s leases busy and none released for %.2f s; "
                    "refusing its requests at once (ShardBusy) until one finishes",
                    self.name,
                    bulkhead.max_concurrent,
                    bulkhead.stalled_for_s(),
                )
            else:
                self._warn(
                    "busy",
                    "shard %s busy: all %s leases in use and no slot freed within %g s "
                    "(or %s callers already waiting); refused with ShardBusy",
                    self.name,
                    bulkhead.max_concurrent,
                    bulkhead.max_wait_s,
                    bulkhead.max_waiting,
                )
            raise ShardBusy(self.name, bulkhead.max_concurrent, bulkhead.max_wait_s) from None
        except BaseException:  # cancelled while waiting: the ticket is not counted
            self.breaker.settle(ticket, _NOT_RUN)
            raise

    def leave(self, ticket: int, exc: BaseException | None) -> None:
        """Release the slot and settle the ticket with the lease's outcome."""
        self.bulkhead.release()
        if exc is None:
            self._machine.succeeded(ticket)  # the common case, without the judging
            return
        self.breaker.settle(ticket, exc)
        if isinstance(exc, SlotMoved) and self.on_moved is not None:
            self.on_moved()  # the router re-reads the topology before the next lease
        if not self._is_fault(exc):
            return
        step_aside()
        if isinstance(exc, ShardTimeout):
            self._warn(
                "timeout",
                "shard %s is slow: a statement or an acquire ran past its deadline (%s)",
                self.name,
                exc,
            )

    # -- what counts, and what is logged --------------------------------------

    def _is_fault(self, exc: BaseException) -> bool:
        if not isinstance(exc, ShardUnavailable | ShardTimeout) or isinstance(exc, ShardBusy):
            return False
        if exc.shard != self.name:
            return False  # another shard's error passing through this lease
        return not (isinstance(exc, ShardUnavailable) and exc.retry_after_s is not None)

    def _transitioned(self, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            log.warning(
                "shard %s: circuit breaker opened after %s consecutive failures; its "
                "requests fail fast for %g s, then one probe is let through",
                self.name,
                self.options.failures,
                self.options.open_s,
            )
        elif state is BreakerState.CLOSED:
            log.info("shard %s: circuit breaker closed, serving again", self.name)

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """Log at most once per `log_every_s` per shard and kind (a stall repeats per request)."""
        now = self._clock()
        if now - self._logged_at.get(kind, -1e18) < self.options.log_every_s:
            return
        self._logged_at[kind] = now
        log.warning(message, *args)

    def state(self) -> dict[str, Any]:
        """The guard's health, for `/readyz` and tools."""
        bulkhead = self.bulkhead
        return {
            "breaker": self.breaker.state.value,
            "in_use": bulkhead.in_use,
            "waiting": bulkhead.waiting,
            "max_concurrent": bulkhead.max_concurrent,
            "stalled": bulkhead.stalled(),
        }


class _NotRun(Exception):
    """Settles a ticket whose lease never reached the shard: not counted either way."""


_NOT_RUN = _NotRun()


class Guarded(AbstractAsyncContextManager[Connection]):
    """`async with`: a connection from `pool`, inside `guard`'s breaker and bulkhead.

    A plain class with slots, not a generator context: it is on every request.
    """

    __slots__ = ("_ctx", "_guard", "_pool", "_slot", "_ticket")

    def __init__(self, guard: ShardGuard, pool: Pool, slot: int | None) -> None:
        self._guard = guard
        self._pool = pool
        self._slot = slot
        self._ctx: Any = None
        self._ticket = 0

    async def __aenter__(self) -> Connection:
        guard = self._guard
        ticket = self._ticket = guard.admit()
        if not guard.bulkhead.try_acquire():  # a free slot needs no coroutine
            await guard.enter(ticket)
        try:
            ctx = self._ctx = self._pool.acquire(self._slot)
            conn: Connection = await ctx.__aenter__()
        except BaseException as exc:
            guard.leave(ticket, exc)
            raise
        return conn

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            result: bool | None = await self._ctx.__aexit__(et, e, tb)
        except BaseException as exc:
            self._guard.leave(self._ticket, exc)
            raise
        self._guard.leave(self._ticket, e)
        return result
