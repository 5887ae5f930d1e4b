"""What the Redis and NATS registries share: clients per (event loop, URL), counted.

A registry keeps one entry per (loop, URL). `acquire` (each registry's own:
Redis opens lazily, NATS connects first) takes a reference; `release` drops
one, and the last one forgets the entry and closes the client. Entries of a
loop that has closed (a test's) are forgotten, never handed out again.
"""

from __future__ import annotations

import asyncio
from typing import Generic, Protocol, TypeVar

__all__ = ["Shared", "SharedRegistry"]


class Shared(Protocol):
    """A client a registry can share: its URL, a reference count and a close."""

    url: str
    refs: int

    async def _close(self) -> None: ...


C = TypeVar("C", bound=Shared)


class SharedRegistry(Generic[C]):
    """The reference-counted table behind `redis_clients` and `nats_clients`."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop | None, C]] = {}

    async def release(self, client: C) -> None:
        """Drop one reference to `client`; the last one closes it and forgets its entry."""
        if client.refs <= 0:
            return
        client.refs -= 1
        if client.refs:
            return
        for key, (_, held) in list(self._open.items()):
            if held is client:
                del self._open[key]
        await client._close()

    def open_clients(self, url: str | None = None) -> list[C]:
        """The clients open now (for `url` only, if given): for tests and diagnostics."""
        return [c for _, c in self._open.values() if url is None or c.url == url]

    def _forget_closed_loops(self) -> None:
        # A test suite runs a loop per test: a client a test leaked belongs to a
        # dead loop and must never be handed to the next one.
        for key, (loop, _) in list(self._open.items()):
            if loop is not None and loop.is_closed():
                del self._open[key]
