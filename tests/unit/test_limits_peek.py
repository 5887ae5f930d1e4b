"""`RateLimiter.peek`: answers what `check` would, without spending the subject's budget."""

from __future__ import annotations

import asyncio

import pytest

from tenfold.limits import MemoryStorage, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0  # epoch-sized, as in production: float rounding matters

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "text",
    [
        "10/minute burst 10 per account",
        "1/minute per ip",
        "1/day burst 3 per x",
        "5/s burst 2 per x",
    ],
)
def test_peek_agrees_with_check_and_costs_nothing(text: str) -> None:
    async def run() -> None:
        clock = Clock()
        limiter = RateLimiter({"r": text}, MemoryStorage(clock=clock))
        rule = limiter.rule("r")
        # many peeks first: none of them may use up the budget
        for _ in range(5000):
            assert (await limiter.peek("r", "s")).allowed
            clock.now += 0.001
        verdicts = []
        for _ in range(rule.burst + 3):
            seen = await limiter.peek("r", "s")
            clock.now += 0.001  # the work between the peek and the charge
            charged = await limiter.check("r", "s")
            verdicts.append((seen.allowed, charged.allowed))
        assert verdicts == [(True, True)] * rule.burst + [(False, False)] * 3
        denied = await limiter.peek("r", "s")
        assert denied.remaining == 0 and denied.retry_after_s > 0
        assert denied.limit == rule.limit
        clock.now += denied.retry_after_s + 0.001
        assert (await limiter.peek("r", "s")).allowed

    asyncio.run(run())
