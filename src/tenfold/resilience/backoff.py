"""The one backoff for loops that retry until they succeed or are stopped.

`retry_idempotent` bounds the attempts of one call. A relay, a consumer
attaching to its broker, or a reconnecting client instead keeps trying for as
long as the process lives; what must be bounded there is each wait, and the
waits of many processes must not line up. `Backoff` gives the delay before
each new try: exponential from `initial_s`, capped at `max_s`, with "equal
jitter" (uniform in the upper half of the current ceiling) so that a loop
never spins with a zero wait, and reset to the start by a success.

    backoff = Backoff(initial_s=0.05, max_s=5.0)
    while not stopping:
        try:
            await step()
            backoff.reset()
        except BrokerUnavailable:
            await asyncio.sleep(backoff.next_s())
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from tenfold.errors import ConfigError

__all__ = ["Backoff"]


class Backoff:
    """Capped exponential delays with jitter; `next_s()` per failure, `reset()` on success.

    Args:
        initial_s: the ceiling of the first delay (> 0).
        max_s: the largest ceiling (>= initial_s); every delay is at most this.
        multiplier: how the ceiling grows per consecutive failure (>= 1).
        rand: a uniform [0, 1) source (tests pass a fixed one).
    """

    def __init__(
        self,
        initial_s: float = 0.05,
        max_s: float = 5.0,
        *,
        multiplier: float = 2.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not (math.isfinite(initial_s) and initial_s > 0):
            raise ConfigError("Backoff.initial_s", f"must be a finite number > 0, got {initial_s}")
        if not (math.isfinite(max_s) and max_s >= initial_s):
            raise ConfigError(
                "Backoff.max_s", f"must be finite and >= initial_s ({initial_s}), got {max_s}"
            )
        if not (math.isfinite(multiplier) and multiplier >= 1.0):
            raise ConfigError("Backoff.multiplier", f"must be >= 1, got {multiplier}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.multiplier = multiplier
        self._rand = rand
        self.failures = 0

    def ceiling_s(self) -> float:
        """The cap of the next delay, without consuming a failure."""
        exponent = min(self.failures, 64)  # past this the cap applies anyway
        return min(self.max_s, self.initial_s * self.multiplier**exponent)

    def next_s(self) -> float:
        """Count one more failure and return the delay before the next try."""
        ceiling = self.ceiling_s()
        self.failures += 1
        return ceiling * (0.5 + self._rand() / 2)

    def reset(self) -> None:
        """A success: the next failure waits the shortest delay again."""
        self.failures = 0
