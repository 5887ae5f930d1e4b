"""The L2 interface: a shared byte store with TTLs, tags and an invalidation channel.

Contract for every backend:
- `get` returns the bytes stored for a key, or None for a miss; it never raises
  for an unreachable or slow server (that is a miss, within the backend's timeout).
- `set`, `delete`, `delete_tag` and `publish` are best effort in the same way:
  a failure is logged once per outage, never raised to the caller.
- `subscribe` delivers every message published on the channel, by any process
  sharing the backend, to `on_message`; `on_message(None)` means "messages may
  have been missed" (e.g. after a reconnect), and the receiver must drop what
  it cannot vouch for.
- `try_lock` / `unlock` are a lease for the cluster-wide single-flight lock:
  `try_lock` answers True (acquired), False (held by someone else) or None
  (unknown: the backend is down or slow), never raises; `unlock` deletes the
  lock only if it still holds the caller's token (compare-and-delete), so a
  lock that expired and was taken over is never released by its old owner.
- `get_many` / `set_many` batch reads and writes (one round trip where the
  backend can); the defaults loop over `get` / `set`.
Keys, tags and channels arrive fully prefixed: backends add nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from tenfold import backends

__all__ = ["L2Backend", "OnMessage", "from_url"]

OnMessage = Callable[[bytes | None], None]


class L2Backend(ABC):
    """A shared second-level cache; see the module docstring for the contract."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The bytes stored for `key`, or None (a miss, or the backend is down)."""

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float, tags: Sequence[str] = ()) -> None:
        """Store `value` for `ttl_s` seconds and record `key` under each tag."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key`."""

    @abstractmethod
    async def delete_tag(self, tag: str) -> None:
        """Remove every key recorded under `tag`, and the tag."""

    @abstractmethod
    async def publish(self, channel: str, message: bytes) -> None:
        """Send `message` to every subscriber of `channel`."""

    @abstractmethod
    async def subscribe(self, channel: str, on_message: OnMessage) -> None:
        """Deliver `channel`'s messages to `on_message` until `close()`.

        Returns once subscribed, or after the backend's timeout if it cannot
        subscribe yet (it keeps trying in the background).
        """

    @abstractmethod
    async def try_lock(self, key: str, token: str, ttl_s: float) -> bool | None:
        """Set `key` to `token` for `ttl_s` s if absent: True, False (held) or None (unknown)."""

    @abstractmethod
    async def unlock(self, key: str, token: str) -> bool | None:
        """Delete `key` if it holds `token`: True (released), False (not ours) or None (unknown)."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """`get` of each key, in order."""
        return [await self.get(key) for key in keys]

    async def set_many(self, items: Sequence[tuple[str, bytes, float, Sequence[str]]]) -> None:
        """`set(key, value, ttl_s, tags)` for each item."""
        for key, value, ttl_s, tags in items:
            await self.set(key, value, ttl_s, tags)

    @abstractmethod
    async def close(self) -> None:
        """Release connections and stop listening."""


def from_url(url: str, **options: Any) -> L2Backend:
    """The L2 backend for `memory://` or `redis://host:port/db` (also `rediss://`).

    Args:
        url: the backend URL; its scheme picks the backend.
        options: keyword options for that backend's constructor.

    Raises:
        ConfigError: for a scheme `tenfold.backends` does not know (it lists those it does).
    """
    cls = backends.backend_class("cache", url)
    result: L2Backend = cls.from_url(url, **options)
    return result
