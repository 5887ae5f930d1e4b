"""`deliver`: the handler's time bound, told apart from other cancellations."""

from __future__ import annotations

import asyncio
import time

import pytest

from tenfold.events.base import Delivery, Event, RetryPolicy
from tenfold.events.dispatch import deliver

EVENT = Event("e1", "shop.orders", "k", 7, b"{}", 0.0)
POLICY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)


def _delivery(attempt: int = 1) -> Delivery:
    return Delivery(EVENT, attempt, 0, 1)


async def test_a_slow_handler_is_cut_off_and_retried() -> None:
    async def slow(delivery: Delivery) -> None:
        await asyncio.sleep(5)

    started = time.monotonic()
    outcome = await deliver(slow, _delivery(), POLICY, "g", 0.05)
    assert time.monotonic() - started < 1.0
    assert outcome.action == "retry" and outcome.error == "handler timed out after 0.05 s"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    last = await deliver(slow, _delivery(attempt=3), POLICY, "g", 0.05)
    assert last.action == "dead" and "timed out" in last.error


async def test_a_fast_handler_leaves_no_timer_behind() -> None:
    async def fast(delivery: Delivery) -> None:
        await asyncio.sleep(0)

    assert (await deliver(fast, _delivery(), POLICY, "g", 0.05)).action == "ack"
    await asyncio.sleep(0.1)  # past the bound: a leftover timer would cancel us here


async def test_the_handlers_own_timeout_error_is_an_ordinary_failure() -> None:
    async def own(delivery: Delivery) -> None:
        raise TimeoutError("the payment API did not answer")

    outcome = await deliver(own, _delivery(), POLICY, "g", 5.0)
    assert outcome.action == "retry"
    assert outcome.error == "TimeoutError: the payment API did not answer"


async def test_an_outside_cancellation_is_not_taken_for_a_timeout() -> None:
    entered = asyncio.Event()

    async def waits(delivery: Delivery) -> None:
        entered.set()
        await asyncio.sleep(5)

    task = asyncio.create_task(deliver(waits, _delivery(), POLICY, "g", 5.0))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
