"""The shared Redis client: one command client and one pub/sub client per URL per loop.

Commands (the limiter's EVALSHA, the cache's GET/SET) go through one
`tenfold.resp.RespClient`: its socket is auto-pipelined, so the capabilities
sharing it also share round trips. Pub/sub needs connections of its own (a
subscribed connection cannot run commands); those come from one redis-py
client, created on first use, each `pubsub()` holding one connection while it
listens.

Flow::

    acquire(url) ─▶ entry for (loop, url)? ─yes─▶ refs += 1 ─▶ the same RedisClient
                        │ no
                        ▼
                    new RedisClient (nothing is contacted: RespClient connects on first call)
    release(client) ─▶ refs -= 1 ─▶ 0? ─▶ close both clients, forget the entry

Invariants:
- At most one open `RedisClient` per (event loop, URL); every capability on
  that URL in that loop gets the same object.
- A client is closed exactly once, by the release that drops its last
  reference; releasing more often than acquiring is a no-op, never a close of
  someone else's client.
- The options of the first acquire (connect timeout, sockets) apply to every
  later holder: the timeouts that matter per call are passed per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from tenfold.clients.registry import SharedRegistry
from tenfold.config import redact_url
from tenfold.errors import MissingDependency
from tenfold.resilience import CircuitBreaker
from tenfold.resp import RespClient

__all__ = ["RedisClient", "RedisClients", "redis_clients"]


class RedisClient:
    """The shared connections to one Redis URL; get it from `redis_clients.acquire`.

    Attributes:
        url: the server's URL (holds the password: never log it; use `where`).
        where: the URL without its password.
        commands: the auto-pipelined command client.
    """

    def __init__(self, url: str, *, connect_timeout_s: float, connections: int) -> None:
        self.url = url
        self.where = redact_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.commands = RespClient.from_url(
            url, connect_timeout_s=connect_timeout_s, connections=connections
        )
        self._pubsub: Any = None
        self.refs = 0
        self.closed = False

    def pubsub_client(self) -> Any:
        """The redis-py client that hands out pub/sub connections (`.pubsub()`), made once.

        It has no read timeout (a subscriber waits for messages) and no hidden
        retries: callers bound each call and retry with `tenfold.resilience.Backoff`.

        Raises:
            MissingDependency: redis-py is not installed.
        """
        if self._pubsub is None:
            try:
                import redis.asyncio as aioredis
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff
            except ImportError as exc:  # pragma: no cover - only without the extra
                raise MissingDependency("redis", "redis", "Redis pub/sub") from exc
            self._pubsub = aioredis.Redis.from_url(
                self.url,
                socket_timeout=None,
                socket_connect_timeout=self.connect_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        return self._pubsub

    async def _close(self) -> None:
        self.closed = True
        await self.commands.close()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None  # built outside a loop (e.g. at import): shared by such callers


class RedisClients(SharedRegistry[RedisClient]):
    """The registry of shared Redis clients; `redis_clients` is the process's one."""

    def acquire(
        self, url: str, *, connect_timeout_s: float = 1.0, connections: int = 1
    ) -> RedisClient:
        """The shared client for `url` in this event loop, opened if need be; release it later.

        Args:
            url: `redis://[[user]:password@]host:port/db` or `rediss://...`.
            connect_timeout_s: bound on opening one connection (first acquire only).
            connections: command sockets, used round robin (first acquire only).

        Raises:
            ConfigError: a malformed URL or option.
        """
        loop = _loop()
        self._forget_closed_loops()
        key = (id(loop), url)
        found = self._open.get(key)
        if found is None or found[0] is not loop or found[1].closed:
            client = RedisClient(url, connect_timeout_s=connect_timeout_s, connections=connections)
            self._open[key] = (loop, client)
        else:
            client = found[1]
        client.refs += 1
        return client

    async def release(self, client: RedisClient) -> None:
        """Drop one reference to `client`; the last one closes its connections."""
        if not client.closed:
            await super().release(client)


redis_clients = RedisClients()
"""The process-wide registry: ``redis_clients.acquire(url)``."""


def outage_breaker(
    name: str, recheck_after_s: float, clock: Callable[[], float] = time.monotonic
) -> CircuitBreaker:
    """The breaker a capability keeps in front of a shared Redis client.

    One failure opens it (a timeout has already cost a caller the whole
    timeout); after `recheck_after_s` one probe is let through. The cache and
    the limiter each keep their own, so each degrades on its own policy.
    """
    return CircuitBreaker(
        name, failure_threshold=1, open_s=recheck_after_s, half_open_max_calls=1, clock=clock
    )
