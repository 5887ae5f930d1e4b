"""Resilience: deadlines, bounded retries with jitter, circuit breakers, bulkheads.

Typical guard around one call to a dependency, outermost first::

    @idempotent(attempts=3)                      # retry transient failures
    async def load(user_id: str) -> Row:
        async with breakers.get("shard:s3"), bulkhead, deadline(1.0, what="load on s3"):
            return await shard.fetchrow(...)

Retries of one call use tenacity (see `tenfold.resilience.retry` for why);
loops that retry for as long as the process lives (relays, consumers
attaching, reconnecting clients) wait `Backoff.next_s()` between tries.
"""

from __future__ import annotations

from tenfold.resilience.backoff import Backoff
from tenfold.resilience.breaker import (
    BreakerMachine,
    BreakerPolicy,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    breakers,
)
from tenfold.resilience.bulkhead import Bulkhead
from tenfold.resilience.retry import DEFAULT_RETRY_ON, idempotent, retry_idempotent
from tenfold.resilience.timeout import deadline

__all__ = [
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
