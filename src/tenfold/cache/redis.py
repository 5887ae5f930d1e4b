"""Redis L2: values with PX TTLs, tags as sets, invalidations over pub/sub.

Every command runs within `timeout_s` behind a circuit breaker
(`tenfold.resilience.CircuitBreaker`): an error or timeout opens it for
`recheck_after_s`, during which calls answer as a miss / no-op without trying;
then one probe is let through, and its success closes the breaker. One
warning is logged per outage; nothing is ever raised to the caller.

Commands go through the process's shared Redis client
(`tenfold.clients.redis`: one auto-pipelined `RespClient` per server, shared
with the rate limiter; an L2 hit is one GET without a connection-pool checkout,
about a third of redis-py's per-call cost; see `benchmarks/cache_hits.py`);
pub/sub connections come from the same shared client's redis-py side. The
subscriber holds its own connection (no read timeout: it waits for messages)
and reconnects with `tenfold.resilience.Backoff` (capped at `recheck_after_s`)
while Redis is unreachable. After any reconnect it calls `on_message(None)`,
because messages published while it was away are lost (pub/sub is
fire-and-forget).

The cluster lock is `SET key token NX PX ttl`; it is released by a Lua
compare-and-delete, so only the holder of the token can delete it.

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
from tenfold.clients.redis import RedisClient, outage_breaker, redis_clients
from tenfold.config import redact_url
from tenfold.errors import ConfigError, MissingDependency
from tenfold.resilience import Backoff, BreakerState
from tenfold.resp import RespReplyError, pack_bulk

try:
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise MissingDependency("redis", "redis", "a redis:// cache URL") from exc

__all__ = ["RedisL2"]

log = logging.getLogger("tenfold.cache.redis")

_ERRORS = (RedisError, RespReplyError, OSError, TimeoutError)
_GET = b"*2\r\n$3\r\nGET\r\n"
T = TypeVar("T")

# Delete KEYS[1] only if it still holds our token ARGV[1]: 1 if deleted, else 0.
_UNLOCK = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


class RedisL2(L2Backend):
    """An L2 shared by every process using the same Redis server.

    Args:
        url: `redis://[:password@]host:port/db` or `rediss://...`.
        timeout_s: bound on one command, connect included.
        connections: sockets for commands, used round robin (one carries tens of
            thousands of pipelined calls per second).
        recheck_after_s: after a failure, how long the breaker stays open (calls
            answer as a miss without trying Redis, so a dead server does not
            cost a timeout per call); also the cap of the subscriber's backoff.
        clock: monotonic seconds, for the breaker only.

    Attributes:
        client: the process's shared client for `url` (released by `close`).
        breaker: the circuit breaker in front of every command.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        timeout_s: float = 0.25,
        connections: int = 1,
        recheck_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        where = f"redis cache at {redact_url(url)}"
        for name, value in (("timeout_s", timeout_s), ("recheck_after_s", recheck_after_s)):
            if not value > 0:
                raise ConfigError(where, f"{name} must be > 0, got {value!r}")
        if connections < 1:
            raise ConfigError(where, f"connections must be >= 1, got {connections!r}")
        self.url = url
        self.where = where
        self.timeout_s = timeout_s
        self.recheck_after_s = recheck_after_s
        self.clock = clock
        self.failures = 0  # calls answered as a miss / no-op because Redis failed
        self._listeners: list[asyncio.Task[None]] = []
        self.breaker = outage_breaker(f"redis-cache {where}", recheck_after_s, clock)
        # The policy without the `async with` wrapper: an L2 hit stays one call deep.
        self._breaker = self.breaker.machine
        self.client: RedisClient = redis_clients.acquire(
            url, connect_timeout_s=timeout_s, connections=connections
        )
        self._resp = self.client.commands
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisL2:
        """The backend for `url`, with keyword `options` as in the constructor."""
        return cls(url, **options)

    async def get(self, key: str) -> bytes | None:
        ticket = self._breaker.admit()
        if ticket is None:
            self.failures += 1
            return None
        try:
            value = await self._resp.execute_packed(_GET + pack_bulk(key), timeout_s=self.timeout_s)
        except _ERRORS as exc:
            self._failed(ticket, exc)
            return None
        self._succeeded(ticket)
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: float, tags: Sequence[str] = ()) -> None:
        await self.set_many([(key, value, ttl_s, tags)])

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []

        async def run() -> list[bytes | None]:
            values = await self._resp.execute("MGET", *keys, timeout_s=self.timeout_s)
            return [v if isinstance(v, bytes) else None for v in values]

        return await self._call(run, [None] * len(keys))

    async def set_many(self, items: Sequence[tuple[str, bytes, float, Sequence[str]]]) -> None:
        if not items:
            return
        commands: list[tuple[Any, ...]] = []
        for key, value, ttl_s, tags in items:
            ttl_ms = max(1, int(ttl_s * 1000))
            commands.append(("SET", key, value, "PX", ttl_ms))
            for tag in tags:
                commands.append(("SADD", tag, key))
                commands.append(("PEXPIRE", tag, ttl_ms, "NX"))
                commands.append(("PEXPIRE", tag, ttl_ms, "GT"))
        await self._call(self._pipeline_checked(commands), None)

    async def try_lock(self, key: str, token: str, ttl_s: float) -> bool | None:
        ttl_ms = max(1, int(ttl_s * 1000))

        async def run() -> bool | None:
            reply = await self._resp.execute(
                "SET", key, token, "NX", "PX", ttl_ms, timeout_s=self.timeout_s
            )
            return reply is not None

        return await self._call(run, None)

    async def unlock(self, key: str, token: str) -> bool | None:
        async def run() -> bool | None:
            reply = await self._resp.execute(
                "EVAL", _UNLOCK, 1, key, token, timeout_s=self.timeout_s
            )
            return bool(reply)

        return await self._call(run, None)

    async def delete(self, key: str) -> None:
        await self._call(lambda: self._resp.execute("DEL", key, timeout_s=self.timeout_s), None)

    async def delete_tag(self, tag: str) -> None:
        async def run() -> None:
            keys = await self._resp.execute("SMEMBERS", tag, timeout_s=self.timeout_s)
            await self._resp.execute("DEL", tag, *(keys or ()), timeout_s=self.timeout_s)

        await self._call(run, None)

    async def ping(self) -> None:
        """Raise unless Redis answers a PING within `timeout_s` (readiness probes)."""
        await self._resp.execute("PING", timeout_s=self.timeout_s)

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call(
            lambda: self._resp.execute("PUBLISH", channel, message, timeout_s=self.timeout_s),
            None,
        )

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
        if not self._closed:  # the shared client closes with its last holder
            self._closed = True
            await redis_clients.release(self.client)

    async def _listen(
        self, channel: str, on_message: OnMessage, ready: asyncio.Future[None]
    ) -> None:
        missed = False  # True once a subscription failed or dropped: messages may be lost
        backoff = Backoff(min(0.05, self.recheck_after_s), self.recheck_after_s)
        while True:
            pubsub = self.client.pubsub_client().pubsub()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await pubsub.subscribe(channel)
                if not ready.done():
                    ready.set_result(None)
                if missed:
                    on_message(None)
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        on_message(msg["data"])
            except _ERRORS as exc:
                missed = True
                self._trip(exc)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout_s):
                        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8
            await asyncio.sleep(backoff.next_s())

    def _pipeline_checked(self, commands: Sequence[Sequence[Any]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            replies = await self._resp.pipeline(commands, timeout_s=self.timeout_s)
            for reply in replies:
                if isinstance(reply, RespReplyError):
                    raise reply

        return run

    def _succeeded(self, ticket: int) -> None:
        breaker = self._breaker
        if breaker.probes_in_flight:  # a half-open probe: this success may close it
            breaker.succeeded(ticket)
            if breaker.state is BreakerState.CLOSED:
                log.info("%s answers again; the shared cache is back", self.where)
        else:
            breaker.succeeded(ticket)

    def _failed(self, ticket: int, exc: BaseException) -> None:
        self.failures += 1
        breaker = self._breaker
        was_closed = breaker.state is BreakerState.CLOSED
        breaker.failed(ticket)
        if was_closed and breaker.state is BreakerState.OPEN:  # once per outage
            log.warning(
                "%s is unavailable (%s: %s); cache reads are misses and writes are skipped "
                "until it answers, rechecking every %g s",
                self.where,
                type(exc).__name__,
                exc or "timed out",
                self.recheck_after_s,
            )

    def _trip(self, exc: BaseException) -> None:
        """A failure seen outside a command (the subscriber lost Redis): open the breaker."""
        ticket = self._breaker.admit()
        if ticket is not None:
            self._failed(ticket, exc)
            self.failures -= 1  # no caller was answered as a miss

    async def _call(self, op: Callable[[], Awaitable[T]], default: T) -> T:
        """Run `op` (whose commands carry `timeout_s`); a failure is `default`, never raised."""
        ticket = self._breaker.admit()
        if ticket is None:
            self.failures += 1
            return default
        try:
            result = await op()
        except _ERRORS as exc:
            self._failed(ticket, exc)
            return default
        self._succeeded(ticket)
        return result
