"""Redis L2: values with PX TTLs, tags as sets, invalidations over pub/sub.

Every command runs within `timeout_s`; an error or timeout marks Redis down for
`recheck_after_s` (during which calls answer as a miss / no-op without trying),
logs one warning per outage, and is never raised to the caller.

The subscriber holds its own connection (no read timeout: it waits for
messages) and reconnects every `recheck_after_s` while Redis is unreachable.
After any reconnect it calls `on_message(None)`, because messages published
while it was away are lost (pub/sub is fire-and-forget).

Tag sets get the longest TTL of their members (`EXPIRE NX` then `EXPIRE GT`,
Redis >= 7), so a tag outlives every key recorded under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from tenfold.cache.base import L2Backend, OnMessage
from tenfold.config import redact_url
from tenfold.errors import ConfigError, MissingDependency

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise MissingDependency("redis", "redis", "a redis:// cache URL") from exc

__all__ = ["RedisL2"]

log = logging.getLogger("tenfold.cache.redis")

_ERRORS = (RedisError, OSError, TimeoutError)
T = TypeVar("T")


class RedisL2(L2Backend):
    """An L2 shared by every process using the same Redis server.

    Args:
        url: `redis://[:password@]host:port/db` or `rediss://...`.
        timeout_s: bound on one command, connect included.
        max_connections: bound on the connection pool (callers beyond it wait,
            within `timeout_s`).
        recheck_after_s: after a failure, how long to answer as a miss without
            trying Redis, so a dead server does not cost a timeout per call.
        clock: monotonic seconds, for `recheck_after_s` only.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        timeout_s: float = 0.25,
        max_connections: int = 64,
        recheck_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        where = f"redis cache at {redact_url(url)}"
        for name, value in (("timeout_s", timeout_s), ("recheck_after_s", recheck_after_s)):
            if not value > 0:
                raise ConfigError(where, f"{name} must be > 0, got {value!r}")
        if max_connections < 1:
            raise ConfigError(where, f"max_connections must be >= 1, got {max_connections!r}")
        self.url = url
        self.where = where
        self.timeout_s = timeout_s
        self.recheck_after_s = recheck_after_s
        self.clock = clock
        self.failures = 0  # calls answered as a miss / no-op because Redis failed
        self._down_until: float | None = None
        self._listeners: list[asyncio.Task[None]] = []
        common: dict[str, Any] = {
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 0),  # no hidden retries: timeout_s is the bound
        }
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            **common,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._sub_client = aioredis.Redis.from_url(url, socket_timeout=None, **common)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisL2:
        """The backend for `url`, with keyword `options` as in the constructor."""
        return cls(url, **options)

    async def get(self, key: str) -> bytes | None:
        async def run() -> bytes | None:
            value = await self._client.get(key)
            return value if isinstance(value, bytes) else None  # no decode_responses: bytes

        return await self._call(run, None)

    async def set(self, key: str, value: bytes, ttl_s: float, tags: Sequence[str] = ()) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))

        async def run() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(key, value, px=ttl_ms)
                for tag in tags:
                    pipe.sadd(tag, key)
                    pipe.pexpire(tag, ttl_ms, nx=True)
                    pipe.pexpire(tag, ttl_ms, gt=True)
                await pipe.execute()

        await self._call(run, None)

    async def delete(self, key: str) -> None:
        await self._call(lambda: self._client.delete(key), None)

    async def delete_tag(self, tag: str) -> None:
        async def run() -> None:
            keys = await self._client.smembers(tag)
            await self._client.delete(tag, *keys)

        await self._call(run, None)

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call(lambda: self._client.publish(channel, message), None)

    async def subscribe(self, channel: str, on_message: OnMessage) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._listen(channel, on_message, ready))
        self._listeners.append(task)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                await asyncio.shield(ready)

    async def close(self) -> None:
        for task in self._listeners:
            task.cancel()
        for task in self._listeners:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._listeners.clear()
        await self._client.aclose()
        await self._sub_client.aclose()

    async def _listen(
        self, channel: str, on_message: OnMessage, ready: asyncio.Future[None]
    ) -> None:
        missed = False  # True once a subscription failed or dropped: messages may be lost
        while True:
            pubsub = self._sub_client.pubsub()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await pubsub.subscribe(channel)
                if not ready.done():
                    ready.set_result(None)
                if missed:
                    on_message(None)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        on_message(msg["data"])
            except _ERRORS as exc:
                missed = True
                self._mark_down(exc)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout_s):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self.recheck_after_s)

    async def _call(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        if self._down_until is not None and self.clock() < self._down_until:
            self.failures += 1
            return default
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await op()
        except _ERRORS as exc:
            self.failures += 1
            self._mark_down(exc)
            return default
        if self._down_until is not None:
            log.info("%s answers again; the shared cache is back", self.where)
            self._down_until = None
        return result

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_until is None:
            log.warning(
                "%s is unavailable (%s: %s); cache reads are misses and writes are skipped "
                "until it answers, rechecking every %g s",
                self.where,
                type(exc).__name__,
                exc or "timed out",
                self.recheck_after_s,
            )
        self._down_until = self.clock() + self.recheck_after_s
