"""The shared NATS connection: one nats-py connection per URL per loop.

The event log (JetStream streams and consumers) and the realtime broker
(fan-out subjects, history and presence streams) use the same connection; each
makes its own JetStream context on it and removes its own subscriptions when
it stops.

Flow::

    acquire(url) ─▶ open entry for (loop, url)? ─yes─▶ refs += 1 ─▶ the same NatsClient
                        │ no (or its connection was closed)
                        ▼
                    connect, bounded by 2 x connect_timeout_s; callers arriving
                    meanwhile wait for the same attempt; a failure is BrokerUnavailable
                    and leaves nothing behind
    release(client) ─▶ refs -= 1 ─▶ 0? ─▶ drain (bounded), close, forget the entry

Reconnecting is nats-py's own loop (it re-subscribes and replays what it
buffered), unbounded in attempts but not in wait: each connection gets a wait
drawn once from `tenfold.resilience.Backoff`, so processes that lost the same
server do not come back in lockstep.

Invariants:
- At most one open `NatsClient` per (event loop, URL).
- A connection is drained and closed exactly once, by the release that drops
  its last reference.
- One "disconnected" warning per outage per connection, not one per capability.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from tenfold.clients.registry import SharedRegistry
from tenfold.config import redact_url
from tenfold.errors import BrokerUnavailable, MissingDependency
from tenfold.resilience.backoff import Backoff

try:
    import nats
    import nats.errors
except ImportError as exc:  # pragma: no cover - only without the extra
    raise MissingDependency("nats-py", "nats", "a nats:// URL") from exc

__all__ = ["RECONNECT_WAIT_S", "NatsClient", "NatsClients", "nats_clients"]

log = logging.getLogger("tenfold.clients.nats")

RECONNECT_WAIT_S = 0.5
"""The ceiling of nats-py's wait between reconnect attempts (jittered per connection)."""

_CONNECT_ERRORS = (nats.errors.Error, OSError, TimeoutError)


class NatsClient:
    """The shared connection to one NATS URL; get it from `nats_clients.acquire`.

    Attributes:
        url: the server URL (may hold credentials: log `safe_url`).
        safe_url: the URL without its password.
        nc: the nats-py connection.
    """

    def __init__(self, url: str, connect_timeout_s: float) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.nc: Any = None
        self.refs = 0
        self.closing = False

    @property
    def usable(self) -> bool:
        """Connected or reconnecting: not closed."""
        return self.nc is not None and not self.nc.is_closed and not self.closing

    async def connect(self) -> None:
        """Open the connection (nats-py retries the first connect forever when
        reconnects are unbounded, so it gets its own bound here)."""
        try:
            async with asyncio.timeout(self.connect_timeout_s * 2):
                self.nc = await nats.connect(
                    self.url,
                    connect_timeout=self.connect_timeout_s,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=Backoff(RECONNECT_WAIT_S, RECONNECT_WAIT_S).next_s(),
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                )
        except (*_CONNECT_ERRORS, nats.errors.NoServersError) as exc:
            raise BrokerUnavailable(self.safe_url, f"cannot connect: {exc!r}") from exc

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats %s: %s", self.safe_url, exc)

    async def _on_disconnect(self) -> None:
        if not self.closing:
            log.warning("nats %s: disconnected, reconnecting", self.safe_url)

    async def _on_reconnect(self) -> None:
        log.info("nats %s: reconnected", self.safe_url)

    async def _close(self) -> None:
        self.closing = True
        nc, self.nc = self.nc, None
        if nc is None or nc.is_closed:
            return
        try:
            await asyncio.wait_for(nc.drain(), self.connect_timeout_s)
        except (*_CONNECT_ERRORS, asyncio.CancelledError):
            with contextlib.suppress(Exception):
                await nc.close()


class NatsClients(SharedRegistry[NatsClient]):
    """The registry of shared NATS connections; `nats_clients` is the process's one."""

    def __init__(self) -> None:
        super().__init__()
        self._connecting: dict[tuple[int, str], asyncio.Task[NatsClient]] = {}

    async def acquire(self, url: str, *, connect_timeout_s: float = 3.0) -> NatsClient:
        """The shared, connected client for `url`; release it when done.

        Args:
            url: `nats://host:port` (or `tls://`).
            connect_timeout_s: bound on one connect attempt (first acquire only).

        Raises:
            BrokerUnavailable: the server cannot be reached in time; nothing is held.
        """
        loop = asyncio.get_running_loop()
        self._forget_closed_loops()
        key = (id(loop), url)
        found = self._open.get(key)
        if found is not None and found[0] is loop and found[1].usable:
            found[1].refs += 1
            return found[1]
        pending = self._connecting.get(key)
        if pending is None:
            pending = loop.create_task(self._connect(key, url, connect_timeout_s))
            self._connecting[key] = pending
        client = await asyncio.shield(pending)
        client.refs += 1
        return client

    async def _connect(
        self, key: tuple[int, str], url: str, connect_timeout_s: float
    ) -> NatsClient:
        try:
            client = NatsClient(url, connect_timeout_s)
            await client.connect()
            self._open[key] = (asyncio.get_running_loop(), client)
            return client
        finally:
            self._connecting.pop(key, None)


nats_clients = NatsClients()
"""The process-wide registry: ``await nats_clients.acquire(url)``."""
