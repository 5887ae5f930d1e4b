"""Access that ends when authorization ends: revoking subscriptions on every node.

A subscription is authorized once, at `sub`; membership can end later (arena's
`POST /rooms/{id}/leave`). Two ways make the hub notice:

    app, after the change commits:  await hub.revoke("room:42", "17")
      -> this node: 17's connections leave room:42 at once and get
         {"op":"unsub","ch":"room:42","reason":"revoked"}
      -> broker.publish_frame("room:42", revoke frame), then a flush
      -> every node subscribed to room:42 does the same on delivery
         (`Hub._deliver` keeps the frame from clients)

    safety net, every `reauthorize_interval_s` on each node (`Reauthorizer`):
      authorize(principal, ch, "read") once per (user, channel) it serves;
      a refusal drops that user's connections from the channel the same way
      ("reason":"forbidden").

Invariants:
1. Once `revoke` has returned, this node delivers no further frame of the
   channel to the user's connections; every other node stops before any
   frame the broker carries after the revoke frame (one subject per channel,
   flushed before `revoke` returns, so a publish made after it is ordered
   after it).
2. A lost signal (broker down, crash between commit and revoke) ends access
   within one interval plus one pass: a pass asks `authorize` at most once per
   distinct (user, channel) on the node, each bounded by `check_timeout_s`.
3. A check that fails (raises, times out) keeps access: an outage of the app's
   store must not unsubscribe everyone; the next pass asks again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from tenfold.realtime import metrics

if TYPE_CHECKING:
    from tenfold.realtime.connection import Connection

__all__ = ["REVOKE_PREFIX", "Reauthorizer", "revoke_frame", "revoked_user"]

log = logging.getLogger("tenfold.realtime")

# Hub-to-hub only: clients never get this frame, and no client frame starts so
# (client publishes are wrapped as {"op":"msg",...} by the publishing node).
REVOKE_PREFIX = '{"op":"revoke"'


def revoke_frame(channel: str, user: str) -> str:
    """The frame one node sends the others: drop `user` from `channel`."""
    return orjson.dumps({"op": "revoke", "ch": channel, "user": user}).decode()


def revoked_user(text: str) -> str | None:
    """The user a revoke frame names, or None when `text` is not one."""
    if not text.startswith(REVOKE_PREFIX):
        return None
    try:
        user = orjson.loads(text).get("user")
    except orjson.JSONDecodeError:
        return None
    return user if isinstance(user, str) else None


class Reauthorizer:
    """The periodic re-check of one node's subscriptions (invariants 2 and 3).

    Args:
        authorize: the hub's check, `async (principal, channel, action) -> bool`.
        drop: `drop(conn, channel, reason)`, the hub's way to end a subscription.
        interval_s: seconds between passes (each wait jittered by ±10%, so
            nodes started together do not query the app's store together).
        check_timeout_s: the bound on one `authorize` call.
    """

    def __init__(
        self,
        authorize: Callable[[Any, str, str], Any],
        drop: Callable[[Connection, str, str], None],
        interval_s: float,
        check_timeout_s: float = 5.0,
    ) -> None:
        self.authorize = authorize
        self.drop = drop
        self.interval_s = interval_s
        self.check_timeout_s = check_timeout_s

    async def run(self, connections: Callable[[], tuple[Connection, ...]]) -> None:
        """Pass after pass until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s * random.uniform(0.9, 1.1))
            try:
                await self.once(connections())
            except Exception:  # the next pass tries again; the loop never dies
                log.exception("realtime: re-checking subscriptions failed")

    async def once(self, connections: tuple[Connection, ...]) -> int:
        """One pass over `connections`; returns how many subscriptions ended."""
        served: dict[tuple[str, str], list[Connection]] = {}
        for conn in connections:
            for ch in tuple(conn.channels):
                served.setdefault((conn.user, ch), []).append(conn)
        dropped = 0
        for (_, ch), conns in served.items():
            try:
                async with asyncio.timeout(self.check_timeout_s):
                    allowed = await self.authorize(conns[0].principal, ch, "read")
            except Exception as exc:  # invariant 3: keep access, ask again next pass
                log.warning("realtime: re-checking access to %s failed: %r", ch, exc)
                continue
            if allowed:
                continue
            for conn in conns:
                if ch in conn.channels:
                    self.drop(conn, ch, "forbidden")
                    dropped += 1
        if dropped:
            metrics.refusals.labels("reauthorize").inc(dropped)
        return dropped
