"""One client socket as the hub sees it: identity, channels, and a bounded way out.

`Connection` holds what every transport shares (the principal, channels, the
publish-rate bucket, frames held back while a subscription recovers history).
How frames leave is the subclass's business:

- `QueuedConnection` (any ASGI server): a bounded deque drained by a writer task.
- `wire.WireConnection` (uvicorn, tenfold's own WebSocket protocol): frames go
  straight into the transport; a deque exists only while the socket is paused.

Both close a client that cannot keep up with 4009 once `limit` frames wait, and
never make the fan-out wait on a socket.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from tenfold.realtime import metrics

__all__ = ["Connection", "QueuedConnection"]


class Connection:
    """See the module docstring; subclasses implement `push`, `close` and `_drop_queued`."""

    __slots__ = (
        "channels",
        "close_code",
        "close_reason",
        "id",
        "limit",
        "name",
        "principal",
        "recovering",
        "tokens",
        "tokens_at",
        "user",
    )

    def __init__(self, limit: int) -> None:
        self.id = secrets.token_hex(8)
        self.limit = limit
        self.channels: set[str] = set()
        # channel -> frames that arrived while its history was being replayed
        self.recovering: dict[str, list[tuple[int | None, str]]] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.principal: Any = None
        self.user = ""
        self.name = ""
        self.tokens = 0.0
        self.tokens_at = 0.0

    def push(self, text: str, *, force: bool = False) -> None:
        """Send a frame; more than `limit` waiting frames close the connection with 4009."""
        raise NotImplementedError

    def close(self, code: int, reason: str = "") -> None:
        raise NotImplementedError

    def _drop_queued(self) -> int:
        """Forget the frames still waiting; how many there were."""
        raise NotImplementedError

    def keepalive(self, now: float) -> None:
        """Called by the hub every ping interval (servers that ping themselves ignore it)."""

    def hold(self, channel: str) -> None:
        """Hold back live frames of `channel` until `release` (history is being replayed)."""
        if self.recovering is None:
            self.recovering = {}
        self.recovering[channel] = []

    def release(self, channel: str) -> list[tuple[int | None, str]]:
        held = self.recovering.pop(channel, []) if self.recovering is not None else []
        if not self.recovering:
            self.recovering = None
        return held

    def deliver(self, channel: str, offset: int | None, text: str) -> None:
        if self.recovering is not None:
            buffer = self.recovering.get(channel)
            if buffer is not None:
                if len(buffer) >= self.limit:
                    self._overflow("slow consumer: overflow while recovering")
                    return
                buffer.append((offset, text))
                return
        self.push(text)

    def _overflow(self, reason: str) -> None:
        """Disconnect a client that cannot keep up: its queued frames are dropped (4009)."""
        metrics.dropped.inc(self._drop_queued() + 1)
        metrics.slow_consumers.inc()
        self.close(4009, reason)


class QueuedConnection(Connection):
    """A connection behind an ASGI `send`: a bounded deque and a writer task."""

    __slots__ = ("queue", "send", "wake", "writer")

    def __init__(self, send: Callable[[Any], Awaitable[None]], limit: int) -> None:
        super().__init__(limit)
        self.send = send
        self.queue: deque[str] = deque()
        self.wake = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None

    def push(self, text: str, *, force: bool = False) -> None:
        if self.close_code is not None:
            return
        if not force and len(self.queue) >= self.limit:
            self._overflow("slow consumer: the send queue overflowed")
            return
        self.queue.append(text)
        self.wake.set()

    def _drop_queued(self) -> int:
        n = len(self.queue)
        self.queue.clear()
        return n

    def _overflow(self, reason: str) -> None:
        super()._overflow(reason)
        if self.writer is not None:
            self.writer.cancel()  # it may be stuck on a full socket

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.wake.set()

    async def write_loop(self) -> None:
        send = self.send
        queue = self.queue
        while True:
            await self.wake.wait()
            self.wake.clear()
            while queue:
                await send({"type": "websocket.send", "text": queue.popleft()})
            if self.close_code is not None:
                return
