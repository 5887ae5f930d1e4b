"""The Redis cache and limiter sit behind `tenfold.resilience` circuit breakers.

A failure opens the breaker: calls are answered degraded without touching
Redis; after `recheck_after_s` (a fake clock here) the breaker is half-open and
lets exactly one probe through; a failed probe opens it again, a good one
closes it. One warning per outage, one "back" line when it closes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from tenfold.cache.redis import RedisL2
from tenfold.limits import Rule
from tenfold.limits.redis import RedisStorage
from tenfold.resilience import BreakerState
from tenfold.resp import RespClient, RespConnectionError

RULE = Rule(limit=100, period_s=1.0)


class Switch:
    """Stands in front of a real RespClient: counts calls, fails them while `down`."""

    def __init__(self, real: RespClient) -> None:
        self.real = real
        self.down = False
        self.calls = 0
        self.gate: asyncio.Event | None = None  # set: calls wait for it (a slow probe)

    async def _pass(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise RespConnectionError("redis at test: simulated outage")
        return await getattr(self.real, name)(*args, **kwargs)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return await self._pass("execute", *args, **kwargs)

    async def execute_packed(self, *args: Any, **kwargs: Any) -> Any:
        return await self._pass("execute_packed", *args, **kwargs)

    async def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        return await self._pass("pipeline", *args, **kwargs)


def _limiter(url: str, clock: Any) -> tuple[RedisStorage, Switch]:
    storage = RedisStorage(
        url, prefix=f"tftest:{uuid.uuid4().hex[:10]}:", timeout_s=2.0, clock=clock
    )
    switch = Switch(storage._client)
    storage._client = switch  # type: ignore[assignment]
    return storage, switch


def _cache(url: str, clock: Any) -> tuple[RedisL2, Switch]:
    l2 = RedisL2(url, timeout_s=2.0, clock=clock)
    switch = Switch(l2._resp)
    l2._resp = switch  # type: ignore[assignment]
    return l2, switch


async def _limiter_call(storage: Any) -> bool:
    before = storage.failures
    await storage.decide("k", RULE)
    return bool(storage.failures == before)  # True: answered by Redis


async def _cache_call(l2: Any) -> bool:
    before = l2.failures
    await l2.get(f"tftest:{uuid.uuid4().hex}")
    return bool(l2.failures == before)


@pytest.mark.parametrize("kind", ["limits", "cache"])
async def test_the_breaker_opens_half_opens_and_closes(
    kind: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    make, call, logger = (
        (_limiter, _limiter_call, "tenfold.limits.redis")
        if kind == "limits"
        else (_cache, _cache_call, "tenfold.cache.redis")
    )
    backend, switch = make(redis_url, lambda: now[0])
    breaker = backend.breaker
    caplog.set_level(logging.INFO, logger=logger)
    try:
        assert await call(backend) and breaker.state is BreakerState.CLOSED

        switch.down = True
        assert not await call(backend)  # tried, failed: the breaker opens
        assert breaker.state is BreakerState.OPEN
        tried = switch.calls
        assert not any([await call(backend) for _ in range(5)])
        assert switch.calls == tried  # open: Redis is not even tried

        now[0] += 1.5  # past recheck_after_s (1 s)
        assert breaker.state is BreakerState.HALF_OPEN
        switch.gate = asyncio.Event()  # hold the probe so the others arrive meanwhile
        probe = asyncio.create_task(call(backend))
        await asyncio.sleep(0)
        others = await asyncio.gather(*(call(backend) for _ in range(5)))
        assert not any(others) and switch.calls == tried + 1  # exactly one probe went
        switch.gate.set()
        assert not await probe  # the probe failed: open again, timer restarted
        assert breaker.state is BreakerState.OPEN
        switch.gate = None

        switch.down = False
        now[0] += 0.5
        assert not await call(backend) and switch.calls == tried + 1  # still open
        now[0] += 1.0
        assert await call(backend)  # the probe succeeds: closed
        assert breaker.state is BreakerState.CLOSED
        assert all([await call(backend) for _ in range(3)])
    finally:
        await backend.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()  # once per outage
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 1
