"""Bulkheads: bounded concurrency per dependency, with a bounded wait.

A slow dependency should use up its own bulkhead, not every task of the
process. Callers beyond `max_concurrent` wait at most `max_wait_s` (and, if
`max_waiting` is set, at most that many wait at once); then `BulkheadFull`.

Invariants (tests/unit/test_resilience.py checks them):

1. At most `max_concurrent` callers are inside the bulkhead at any time.
2. No caller waits longer than `max_wait_s` (plus scheduling latency) for a
   slot; a refused caller never entered and holds nothing.
3. A slot is returned exactly once per entry, whether the body returns,
   raises or is cancelled; `in_use` and the gauge always agree.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

from tenfold.errors import BulkheadFull, ConfigError
from tenfold.observe import metrics

__all__ = ["Bulkhead"]


class Bulkhead:
    """At most `max_concurrent` calls in flight for `name`; use ``async with bulkhead:``.

    Args:
        name: the dependency, e.g. "redis" or "shard:s3"; a metric label.
        max_concurrent: calls allowed inside at once.
        max_wait_s: longest wait for a slot before `BulkheadFull`; 0 refuses
            at once when full.
        max_waiting: most callers allowed to wait at once (None: bounded by
            `max_wait_s` only); beyond it, `BulkheadFull` at once.
    """

    def __init__(
        self,
        name: str,
        max_concurrent: int,
        max_wait_s: float,
        *,
        max_waiting: int | None = None,
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
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_concurrent)
        self._in_use = 0
        self._waiting = 0
        metrics.bulkhead_in_use.labels(name).set(0)

    @property
    def in_use(self) -> int:
        """Calls inside the bulkhead now."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot now."""
        return self._waiting

    def _reject(self) -> BulkheadFull:
        metrics.bulkhead_rejections.labels(self.name).inc()
        return BulkheadFull(self.name, self.max_concurrent, self.max_wait_s)

    async def acquire(self) -> None:
        """Take a slot, waiting at most `max_wait_s`.

        Raises:
            BulkheadFull: no slot freed in time, or too many callers waiting.
        """
        if self._slots.locked():
            if self.max_wait_s == 0 or (
                self.max_waiting is not None and self._waiting >= self.max_waiting
            ):
                raise self._reject()
            self._waiting += 1
            try:
                async with asyncio.timeout(self.max_wait_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise self._reject() from None
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()  # free: returns without suspending
        self._in_use += 1
        metrics.bulkhead_in_use.labels(self.name).set(self._in_use)

    def release(self) -> None:
        """Return a slot taken by `acquire`."""
        self._in_use -= 1
        metrics.bulkhead_in_use.labels(self.name).set(self._in_use)
        self._slots.release()

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
