"""In-process broker (embedded mode): one node, a ring buffer per channel.

The epoch is made when the broker is created, so a restarted process is a new
epoch and clients holding an old position are told to resync. Offsets are
contiguous (1, 2, 3, ...) per channel.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from tenfold.realtime.base import Broker, Position
from tenfold.realtime.protocol import msg_frame

__all__ = ["MemoryBroker"]


class _Channel:
    __slots__ = ("entries", "last")

    def __init__(self, size: int) -> None:
        self.last = 0
        self.entries: deque[tuple[int, float, str]] = deque(maxlen=size)


class MemoryBroker(Broker):
    """Fan-out, history, presence and connection counts inside one process."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, **options: float) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.clock = clock
        self.epoch = secrets.token_hex(6)
        self._channels: dict[str, _Channel] = {}
        self._subscribed: set[str] = set()
        # channel -> conn -> (user, name, expires)
        self._presence: dict[str, dict[str, tuple[str, str, float]]] = {}
        # user -> conn -> expires, oldest expiry first (renewals move to the end)
        self._conns: dict[str, OrderedDict[str, float]] = {}

    def _channel(self, ch: str) -> _Channel:
        c = self._channels.get(ch)
        if c is None:
            c = self._channels[ch] = _Channel(int(self.history_size))
        return c

    def _trim(self, c: _Channel) -> None:
        cutoff = self.clock() - self.history_ttl_s
        while c.entries and c.entries[0][1] < cutoff:
            c.entries.popleft()

    async def publish(self, channel: str, data: bytes, *, ephemeral: bool = False) -> int | None:
        if ephemeral:
            if channel in self._subscribed:
                self.deliver(channel, None, msg_frame(channel, data), time.time())
            return None
        c = self._channel(channel)
        c.last += 1
        text = msg_frame(channel, data, self.epoch, c.last)
        c.entries.append((c.last, self.clock(), text))
        self._trim(c)
        if channel in self._subscribed:
            self.deliver(channel, c.last, text, time.time())
        return c.last

    async def publish_frame(self, channel: str, text: str) -> None:
        if channel in self._subscribed:
            self.deliver(channel, None, text, 0.0)

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def position(self, channel: str) -> Position:
        c = self._channels.get(channel)
        return Position(self.epoch, c.last if c else 0)

    async def since(self, channel: str, epoch: str, offset: int) -> list[tuple[int, str]] | None:
        if epoch != self.epoch:
            return None
        c = self._channels.get(channel)
        last = c.last if c else 0
        if offset > last:
            return None  # a position from the future: not this history
        if offset == last:
            return []
        assert c is not None
        self._trim(c)
        if not c.entries or c.entries[0][0] > offset + 1:
            return None  # the gap is older than the history
        return [(o, text) for o, _, text in c.entries if o > offset]

    async def presence_add(self, channel: str, conn: str, user: str, name: str) -> None:
        self._presence.setdefault(channel, {})[conn] = (
            user,
            name,
            self.clock() + self.presence_ttl_s,
        )

    async def presence_remove(self, channel: str, conn: str) -> None:
        members = self._presence.get(channel)
        if members is not None:
            members.pop(conn, None)
            if not members:
                del self._presence[channel]

    async def presence_list(self, channel: str) -> list[dict[str, str]]:
        now = self.clock()
        seen: dict[str, str] = {}
        for user, name, expires in self._presence.get(channel, {}).values():
            if expires > now:
                seen.setdefault(user, name)
        return [{"user": u, "name": n} for u, n in sorted(seen.items())]

    async def presence_users(self, channel: str, users: list[str]) -> set[str]:
        now = self.clock()
        wanted = set(users)
        members = self._presence.get(channel, {}).values()
        return {u for u, _, expires in members if expires > now and u in wanted}

    async def conn_acquire(self, user: str, conn: str, limit: int) -> bool:
        now = self.clock()
        conns = self._conns.get(user)
        if conns is None:
            conns = self._conns[user] = OrderedDict()
        while conns:  # expired entries are at the front: each is dropped once
            first = next(iter(conns))
            if conns[first] > now:
                break
            del conns[first]
        if len(conns) >= limit:
            return False
        conns[conn] = now + self.presence_ttl_s
        return True

    async def conn_release(self, user: str, conn: str) -> None:
        conns = self._conns.get(user)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self._conns[user]

    async def refresh(
        self, presence: list[tuple[str, str, str, str]], conns: list[tuple[str, str]]
    ) -> None:
        expires = self.clock() + self.presence_ttl_s
        for channel, conn, user, name in presence:
            self._presence.setdefault(channel, {})[conn] = (user, name, expires)
        for user, conn in conns:
            mine = self._conns.get(user)
            if mine is None:
                mine = self._conns[user] = OrderedDict()
            mine[conn] = expires
            mine.move_to_end(conn)
