"""`ShedLog`: shed requests leave a log line, at most one per route per second.

An overload sheds many requests at once; a line per refusal would flood the
log when it is least affordable, and none (as before issue 13) hides it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tenfold.errors import Overloaded

__all__ = ["ShedLog"]

log = logging.getLogger("tenfold.gateway")


class ShedLog:
    """Log shed requests: the first of a quiet route at once, the rest as one
    line per route per `every_s` with their count, so an overload is visible
    in the log without a line per refused request."""

    def __init__(self, every_s: float = 1.0, clock: Any = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self.pending: dict[str, int] = {}  # route -> sheds not yet logged
        self.last: dict[str, float] = {}  # route -> when a line was last written
        self._flush: asyncio.TimerHandle | None = None
        self._detail: Overloaded | None = None  # the newest shed, for the counted line

    def shed(self, route: str, exc: Overloaded) -> None:
        """Count one shed request of `route` (a template); log now or within `every_s`."""
        now = self.clock()
        if now - self.last.get(route, -self.every_s) >= self.every_s and route not in self.pending:
            self.last[route] = now
            self._write(route, 1, exc)
            return
        self.pending[route] = self.pending.get(route, 0) + 1
        self._detail = exc
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.every_s, self.flush)

    def flush(self) -> None:
        """Write what has been counted since the last lines (the timer calls it)."""
        self._flush = None
        pending, self.pending = self.pending, {}
        now = self.clock()
        detail = self._detail
        for route, count in pending.items():
            self.last[route] = now
            if detail is not None:
                self._write(route, count, detail)

    @staticmethod
    def _write(route: str, count: int, exc: Overloaded) -> None:
        log.warning(
            "shed %d request(s) to %s with 503: admission limit %d, %d in flight (%s class)",
            count,
            route,
            exc.limit,
            exc.in_flight,
            exc.priority,
        )
