"""Bulkheads: bounded concurrency per dependency, with a bounded wait.

A slow dependency should use up its own bulkhead, not every task of the
process. Callers beyond `max_concurrent` wait at most `max_wait_s` (and, if
`max_waiting` is set, at most that many wait at once); then `BulkheadFull`.

With `stall_after_s`, a full bulkhead that has freed no slot for that long is
*stalled*: new callers are refused at once instead of waiting. A dependency
that hangs (locks held for seconds) would otherwise keep `max_waiting` callers
parked for `max_wait_s` each, and every parked caller holds what it holds
upstream (a request's admission slot), which is how one stalled shard used to
starve the healthy ones.

Invariants (tests/unit/test_resilience.py checks them):

1. At most `max_concurrent` callers are inside the bulkhead at any time.
2. No caller waits longer than `max_wait_s` (plus scheduling latency) for a
   slot; a refused caller never entered and holds nothing.
3. A slot is returned exactly once per entry, whether the body returns,
   raises or is cancelled; `in_use` and the gauge always agree (the gauge
   reads `in_use` when scraped).
4. A freed slot goes to the longest-waiting caller, never to a newcomer.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
import weakref
from collections.abc import Callable
from types import TracebackType

from tenfold.errors import BulkheadFull, ConfigError
from tenfold.observe import metrics

__all__ = ["Bulkhead"]


def _in_use_of(ref: weakref.ref[Bulkhead]) -> float:
    """The gauge's value: the bulkhead's in-use count (0 once it is gone)."""
    bulkhead = ref()
    return 0.0 if bulkhead is None else float(bulkhead.in_use)


class Bulkhead:
    """At most `max_concurrent` calls in flight for `name`; use ``async with bulkhead:``.

    Args:
        name: the dependency, e.g. "redis" or "shard:s3"; a metric label.
        max_concurrent: calls allowed inside at once.
        max_wait_s: longest wait for a slot before `BulkheadFull`; 0 refuses
            at once when full.
        max_waiting: most callers allowed to wait at once (None: bounded by
            `max_wait_s` only); beyond it, `BulkheadFull` at once.
        stall_after_s: when full and no slot was freed for this long, refuse
            at once instead of waiting (None: always wait up to `max_wait_s`).
        clock: monotonic seconds, for the stall rule; a fake in tests.
    """

    def __init__(
        self,
        name: str,
        max_concurrent: int,
        max_wait_s: float,
        *,
        max_waiting: int | None = None,
        stall_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent < 1:
            raise ConfigError(
                f"bulkhead {name}: max_concurrent", f"must be >= 1, got {max_concurrent}"
            )
        if not (math.isfinite(max_wait_s) and max_wait_s >= 0):
            raise ConfigError(
                f"bulkhead {name}: max_wait_s", f"must be a finite number >= 0, got {max_wait_s}"
            )
        if max_waiting is not None and max_waiting < 0:
            raise ConfigError(f"bulkhead {name}: max_waiting", f"must be >= 0, got {max_waiting}")
        if stall_after_s is not None and not (math.isfinite(stall_after_s) and stall_after_s > 0):
            raise ConfigError(
                f"bulkhead {name}: stall_after_s",
                f"must be a finite number > 0 or None, got {stall_after_s}",
            )
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._in_use = 0
        self._waiting = 0
        # FIFO of waiters; `release` hands its slot straight to the first one
        # still waiting (counted in `_in_use` at once, so no newcomer can take
        # it first). Done futures (refused or cancelled waiters) are skipped.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # When a slot was last freed, or the bulkhead last filled up: the
        # stall clock starts at whichever came later.
        self._progress_at = clock()
        self._rejections = metrics.bulkhead_rejections.labels(name)
        # The in-use gauge is read at scrape time, not written per call: two
        # gauge writes (each takes a lock) cost more than the rest of a lease.
        ref = weakref.ref(self)
        metrics.bulkhead_in_use.labels(name).set_function(lambda: _in_use_of(ref))

    @property
    def in_use(self) -> int:
        """Calls inside the bulkhead now."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot now."""
        return self._waiting

    def stalled_for_s(self) -> float:
        """Seconds the bulkhead has been full without freeing a slot (0 when not full)."""
        if self._in_use < self.max_concurrent:
            return 0.0
        return max(0.0, self._clock() - self._progress_at)

    def stalled(self) -> bool:
        """Full, and no slot freed for `stall_after_s`: callers are refused at once."""
        return self.stall_after_s is not None and self.stalled_for_s() >= self.stall_after_s

    def _reject(self) -> BulkheadFull:
        self._rejections.inc()
        return BulkheadFull(self.name, self.max_concurrent, self.max_wait_s)

    def _take(self) -> None:
        self._in_use += 1
        if self._in_use == self.max_concurrent:
            self._progress_at = self._clock()  # just filled up: the stall clock starts

    def try_acquire(self) -> bool:
        """Take a free slot without waiting; False when every slot is taken.

        For hot paths: callers that get False fall back to `await acquire()`,
        which waits (or refuses); a True needs a `release` like any slot.
        """
        if self._in_use < self.max_concurrent:
            self._take()
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting at most `max_wait_s`.

        Raises:
            BulkheadFull: no slot freed in time, too many callers waiting, or
                the bulkhead is stalled.
        """
        if self._in_use < self.max_concurrent:
            # The common case: no suspension, no timer. FIFO still holds: a
            # caller only waits while every slot is taken, and `release` hands
            # a freed slot to a live waiter, so there is none while one is free.
            self._take()
            return
        if (
            self.max_wait_s == 0
            or (self.max_waiting is not None and self._waiting >= self.max_waiting)
            or self.stalled()
        ):
            raise self._reject()
        self._waiting += 1
        try:
            await self._wait_for_slot()
        finally:
            self._waiting -= 1

    async def _wait_for_slot(self) -> None:
        """Wait at most `max_wait_s`, and give up as soon as the bulkhead stalls.

        Without the second rule, callers already waiting when the dependency
        hangs would each sit out the whole `max_wait_s`; with it they leave
        `stall_after_s` after the last slot was freed. The wait is cut into
        steps that end when the stall clock would run out, to look again.
        On return the slot is the caller's (`release` counted it already).
        """
        loop = asyncio.get_running_loop()
        slot: asyncio.Future[None] = loop.create_future()
        self._waiters.append(slot)
        give_up = loop.time() + self.max_wait_s
        try:
            while True:
                remaining = give_up - loop.time()
                if remaining <= 0:
                    raise self._reject()
                step = remaining
                if self.stall_after_s is not None:
                    step = min(step, max(self.stall_after_s - self.stalled_for_s(), 0.001))
                # asyncio.wait does not cancel `slot` when the step times out.
                await asyncio.wait((slot,), timeout=step)
                if slot.done():
                    return
                if self.stalled():
                    raise self._reject()
        except BaseException:
            if slot.done() and not slot.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            else:
                slot.cancel()  # leave the queue; `release` skips it
            raise

    def release(self) -> None:
        """Return a slot taken by `acquire` (to the first waiter, if any)."""
        self._in_use -= 1
        if self.stall_after_s is not None:
            self._progress_at = self._clock()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)
                return

    async def __aenter__(self) -> Bulkhead:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
