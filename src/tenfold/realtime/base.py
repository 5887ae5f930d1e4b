"""The broker interface behind the realtime hub: what crosses nodes.

A `Broker` carries, for one node's `Hub`:

- fan-out: `publish(channel, data)` reaches every node that `subscribe`d the
  channel (the hub subscribes while it has local subscribers); the payload
  travels as the final server frame, encoded once by the publishing node;
- history: stored publishes get an offset that grows per channel, kept up to
  `history_size` messages and `history_ttl_s` seconds; `since` answers the
  frames after a client's position, or None when the epoch changed or the gap
  is no longer in the history;
- presence: (channel, connection) entries with a TTL the hub refreshes, so a
  dead node's clients drop out;
- connection counts per user, cluster-wide, with the same TTL.

`memory.py` is one process (embedded mode); `nats.py` spans nodes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenfold import backends

__all__ = ["Broker", "Deliver", "Position", "broker_from_url"]

# (channel, offset or None for ephemeral/presence frames, frame text,
#  wall-clock time of the publish or 0.0 when unknown, e.g. join/leave frames)
Deliver = Callable[[str, int | None, str, float], None]


@dataclass(frozen=True, slots=True)
class Position:
    """A point in a channel's history: a client's recovery position."""

    epoch: str
    offset: int


class Broker(abc.ABC):
    """Cross-node fan-out, history, presence and connection counts for one node."""

    def __init__(
        self,
        *,
        history_size: int = 100,
        history_ttl_s: float = 300.0,
        presence_ttl_s: float = 30.0,
    ) -> None:
        self.history_size = history_size
        self.history_ttl_s = history_ttl_s
        self.presence_ttl_s = presence_ttl_s
        self.deliver: Deliver = lambda ch, offset, text, at: None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Broker:
        """The broker for `url` with constructor `options`; a broker that takes no URL
        (in-process) ignores it and a connection timeout. Network brokers override it."""
        options.pop("connect_timeout_s", None)
        return cls(**options)

    async def start(self, deliver: Deliver) -> None:
        """Connect; from now on frames for subscribed channels go to `deliver`."""
        self.deliver = deliver

    async def close(self) -> None:  # noqa: B027 - optional: nothing to close in-process
        """Disconnect (this node's presence and connection entries are removed)."""

    @abc.abstractmethod
    async def publish(self, channel: str, data: bytes, *, ephemeral: bool = False) -> int | None:
        """Store (unless ephemeral) and fan out `data` (JSON bytes); return the offset."""

    @abc.abstractmethod
    async def publish_frame(self, channel: str, text: str) -> None:
        """Fan out a ready frame (join/leave) to every node; not stored."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Receive the channel's frames on this node (returns once in effect)."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving the channel's frames on this node."""

    @abc.abstractmethod
    async def position(self, channel: str) -> Position:
        """The channel's epoch and its last offset (0 when empty)."""

    @abc.abstractmethod
    async def since(self, channel: str, epoch: str, offset: int) -> list[tuple[int, str]] | None:
        """Stored frames after `offset` in order, or None when they cannot all be given."""

    @abc.abstractmethod
    async def presence_add(self, channel: str, conn: str, user: str, name: str) -> None: ...

    @abc.abstractmethod
    async def presence_remove(self, channel: str, conn: str) -> None: ...

    @abc.abstractmethod
    async def presence_list(self, channel: str) -> list[dict[str, str]]:
        """Who is in the channel on any node: one entry per user."""

    @abc.abstractmethod
    async def presence_users(self, channel: str, users: list[str]) -> set[str]:
        """Which of `users` have a presence entry in the channel on any node."""

    @abc.abstractmethod
    async def conn_acquire(self, user: str, conn: str, limit: int) -> bool:
        """Count `conn` for `user` unless the user already has `limit` connections.

        O(1) per call in this process, whatever the user's connection count."""

    @abc.abstractmethod
    async def conn_release(self, user: str, conn: str) -> None: ...

    @abc.abstractmethod
    async def refresh(
        self, presence: list[tuple[str, str, str, str]], conns: list[tuple[str, str]]
    ) -> None:
        """Heartbeat: renew the TTL of this node's presence and connection entries."""

    async def ping(self) -> None:  # noqa: B027 - optional: in-process is always there
        """Raise when the broker is unreachable (readiness)."""


def broker_from_url(url: str, **options: Any) -> Broker:
    """The broker for the events URL: in-process for memory://, NATS for nats:// (tls://),
    or the class registered for the scheme with `tenfold.backends.register("realtime", ...)`.

    Raises:
        ConfigError: for a scheme `tenfold.backends` does not know (it lists those it does).
    """
    broker: Broker = backends.backend_class("realtime", url).from_url(url, **options)
    return broker
