"""Deadlines: ``async with deadline(2.0, what="read of shard s3"):``.

Built on `asyncio.timeout`; an expiry is raised as `DeadlineExceeded` naming
what timed out. A `TimeoutError` raised by the body itself (not by this
deadline expiring) passes through unchanged, so nested deadlines report the
one that actually fired.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tenfold.errors import ConfigError, DeadlineExceeded

__all__ = ["deadline"]


@asynccontextmanager
async def deadline(seconds: float, *, what: str) -> AsyncIterator[None]:
    """Cancel the body if it runs longer than `seconds`.

    Args:
        seconds: the time allowed, > 0.
        what: what is being timed, for the error ("query on shard s3").

    Raises:
        DeadlineExceeded: the body did not finish in time (it was cancelled).
        ConfigError: `seconds` is not a finite number > 0.
    """
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"deadline for {what}", f"must be a finite number > 0, got {seconds}")
    timer = asyncio.timeout(seconds)
    try:
        async with timer:
            yield
    except TimeoutError as exc:
        if timer.expired():
            raise DeadlineExceeded(what, seconds) from exc
        raise
