"""GCRA, the generic cell rate algorithm (as redis-cell and Brandur's throttled).

Pure policy: no I/O, the clock is passed in. `gcra.lua` is the same algorithm
for Redis and must stay in step with this module (the shared storage suite
checks that both give the same decisions).

Flow of one decision, with T = period / limit and tolerance = T * burst::

    tat      = max(stored TAT or now, now)        # theoretical arrival time
    new_tat  = tat + T * cost
    allow_at = new_tat - tolerance
    now >= allow_at - EPSILON_S ? allow, store new_tat : deny, keep the stored TAT

Invariants (tests/unit/test_gcra.py checks them with Hypothesis):

1. In any window of length W, allowed cost never exceeds
   limit * W / period + burst (+ EPSILON_S / T of clock slack).
2. A client spending exactly one request every T seconds is never refused.
3. `remaining` is never negative; `retry_after_s > 0` if and only if denied.
4. A denial leaves the TAT unchanged, so refused requests cost nothing.
5. The stored TAT is always > now after an allowed request, and stays within
   now + tolerance, so a key may be forgotten once `reset_after_s` has passed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from tenfold.limits.rules import Rule

__all__ = ["EPSILON_S", "Decision", "decide"]

# Clock slack, a constant added to the tolerance. Times are epoch floats
# (~1.7e9 s), where each TAT step rounds by up to half an ulp (1.2e-7 s) and the
# rounding is systematic for a fixed T: without slack, a client paced exactly at
# the rate would be refused after a few steps. 100 µs absorbs ~800 such steps
# in a row and is far below network jitter; it allows at most EPSILON_S / T
# extra requests in any window, once, never a faster sustained rate.
EPSILON_S = 1e-4


class Decision(NamedTuple):
    """The answer to one rate-limit check (a NamedTuple: one is made per request,
    and a frozen dataclass pays an `object.__setattr__` per field).

    Attributes:
        allowed: whether the request may proceed.
        remaining: how many more unit-cost requests would be allowed right now.
        retry_after_s: when denied, seconds until this request would be allowed; else 0.
        reset_after_s: seconds until the subject's bucket is full again.
        limit: the rule's limit (requests per period).
    """

    allowed: bool
    remaining: int
    retry_after_s: float
    reset_after_s: float
    limit: int


def decide(
    tat: float | None, now: float, rule: Rule, cost: int = 1
) -> tuple[float | None, Decision]:
    """One GCRA step.

    Args:
        tat: the stored theoretical arrival time, or None for an unknown subject.
        now: the current time in seconds (any epoch, the same as `tat`'s).
        rule: the rule to apply.
        cost: how many requests this one counts for (>= 1).

    Returns:
        The TAT to store (unchanged when denied) and the decision.
    """
    interval = rule.emission_interval_s
    tolerance = rule.tolerance_s
    base = now if tat is None or tat < now else tat
    new_tat = base + interval * cost
    allow_at = new_tat - tolerance
    if now >= allow_at - EPSILON_S:
        return new_tat, Decision(
            allowed=True,
            remaining=_remaining(now, new_tat, interval, tolerance),
            retry_after_s=0.0,
            reset_after_s=new_tat - now,
            limit=rule.limit,
        )
    return tat, Decision(
        allowed=False,
        remaining=_remaining(now, base, interval, tolerance),
        retry_after_s=allow_at - now,
        reset_after_s=base - now,
        limit=rule.limit,
    )


def _remaining(now: float, tat: float, interval: float, tolerance: float) -> int:
    # How many more intervals fit between the TAT and now + tolerance.
    # Same slack as the allow test, so remaining >= 1 iff a unit request would pass.
    return max(0, math.floor((tolerance - (tat - now) + EPSILON_S) / interval))
