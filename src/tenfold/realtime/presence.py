"""Join/leave events of one node: de-duplicated per user, coalesced per channel.

`PresenceEvents.joined(ch, user, name)` / `left(...)` are called once per local
connection entering/leaving a channel (after the broker's presence entry was
added/removed). Only a user's first local connection to a channel is a join and
only the last one leaving is a leave. Changes are collected per channel for
`window_s` and then sent as at most one `join` and one `leave` frame per
channel, each listing users: a burst of N subscribes costs O(N) work and a
handful of frames, not one frame per subscriber per subscribe (O(N²)). A join
and a leave of one user inside one window cancel out.

A leave is also dropped when the user still has a presence entry on another
node (the broker is asked once per leaving user, at flush time), so a user
connected through two nodes does not look gone while one connection remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tenfold.realtime import protocol as p
from tenfold.realtime.base import Broker

__all__ = ["PresenceEvents"]

log = logging.getLogger("tenfold.realtime")


class PresenceEvents:
    """See the module docstring."""

    def __init__(self, broker: Broker, window_s: float = 0.05) -> None:
        self.broker = broker
        self.window_s = window_s
        self.counts: dict[str, dict[str, int]] = {}  # channel -> user -> local connections
        # channel -> user -> (True for join / False for leave, name), not yet sent
        self.pending: dict[str, dict[str, tuple[bool, str]]] = {}
        self.frames_sent = 0
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    def joined(self, ch: str, user: str, name: str) -> None:
        users = self.counts.get(ch)
        if users is None:
            users = self.counts[ch] = {}
        n = users.get(user, 0)
        users[user] = n + 1
        if n == 0:
            self._change(ch, user, name, True)

    def left(self, ch: str, user: str, name: str) -> None:
        users = self.counts.get(ch)
        n = users.get(user, 0) if users is not None else 0
        if users is None or n == 0:
            return
        if n > 1:
            users[user] = n - 1
            return
        del users[user]
        if not users:
            del self.counts[ch]
        self._change(ch, user, name, False)

    def _change(self, ch: str, user: str, name: str, join: bool) -> None:
        changes = self.pending.get(ch)
        if changes is None:
            changes = self.pending[ch] = {}
        before = changes.get(user)
        if before is not None and before[0] != join:
            del changes[user]  # joined and left (or left and came back) within the window
            if not changes:
                del self.pending[ch]
            return
        changes[user] = (join, name)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self._due)

    def _due(self) -> None:
        self._timer = None
        task = asyncio.create_task(self.flush(), name="realtime:presence")
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Send what is pending now (the hub calls it on stop; the timer otherwise)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, {}
        for ch, changes in pending.items():
            joins = [(u, n) for u, (j, n) in changes.items() if j]
            leaves = [(u, n) for u, (j, n) in changes.items() if not j]
            try:
                if leaves:
                    elsewhere = await self.broker.presence_users(ch, [u for u, _ in leaves])
                    leaves = [(u, n) for u, n in leaves if u not in elsewhere]
                for op, users in (("join", joins), ("leave", leaves)):
                    if users:
                        await self.broker.publish_frame(ch, p.presence_frame(op, ch, users))
                        self.frames_sent += 1
            except Exception as exc:  # presence queries stay right; only the events are lost
                log.warning("realtime: join/leave events of %s not sent: %r", ch, exc)

    async def close(self) -> None:
        await self.flush()
        for task in list(self._flushing):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
