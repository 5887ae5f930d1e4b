"""An in-process L2: for embedded mode and tests; shared only by caches given the same instance.

Messages published on a channel reach every subscriber of this instance on the
next event-loop turn, which is how two `TieredCache`s in one process (a test's
"two nodes") see each other's invalidations.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from tenfold.cache.base import L2Backend, OnMessage
from tenfold.errors import ConfigError

__all__ = ["MemoryL2"]


class MemoryL2(L2Backend):
    """A bounded dict with TTLs and tags.

    Args:
        max_entries: bound on stored keys; the oldest written is evicted first.
        clock: seconds (tests pass a fake clock).
    """

    def __init__(
        self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ConfigError("cache memory max_entries", f"must be >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.clock = clock
        # key → (value, expires_at, tags); tag → keys, pruned with the keys so it stays bounded
        self._data: OrderedDict[str, tuple[bytes, float, tuple[str, ...]]] = OrderedDict()
        self._tags: dict[str, set[str]] = {}
        self._subscribers: dict[str, list[OnMessage]] = {}
        self._locks: dict[str, tuple[str, float]] = {}  # key → (token, expires_at)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryL2:
        """A fresh backend (`memory://`), with keyword `options` as in the constructor."""
        return cls(**options)

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if self.clock() >= item[1]:
            self._drop(key)
            return None
        return item[0]

    async def set(self, key: str, value: bytes, ttl_s: float, tags: Sequence[str] = ()) -> None:
        self._drop(key)
        self._data[key] = (value, self.clock() + ttl_s, tuple(tags))
        for tag in tags:
            self._tags.setdefault(tag, set()).add(key)
        while len(self._data) > self.max_entries:
            self._drop(next(iter(self._data)))

    async def delete(self, key: str) -> None:
        self._drop(key)

    async def delete_tag(self, tag: str) -> None:
        for key in list(self._tags.get(tag, ())):
            self._drop(key)
        self._tags.pop(tag, None)

    def _drop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is None:
            return
        for tag in item[2]:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tags[tag]

    async def try_lock(self, key: str, token: str, ttl_s: float) -> bool | None:
        now = self.clock()
        held = self._locks.get(key)
        if held is not None and now < held[1]:
            return False
        if len(self._locks) >= self.max_entries:  # bounded: prune expired leases
            for stale in [k for k, (_, until) in self._locks.items() if now >= until]:
                del self._locks[stale]
            if len(self._locks) >= self.max_entries:
                return None  # cannot record it: unknown, the caller loads locally
        self._locks[key] = (token, now + ttl_s)
        return True

    async def unlock(self, key: str, token: str) -> bool | None:
        held = self._locks.get(key)
        if held is None or held[0] != token:
            return False
        del self._locks[key]
        return held[1] > self.clock()

    async def publish(self, channel: str, message: bytes) -> None:
        loop = asyncio.get_running_loop()
        for callback in list(self._subscribers.get(channel, ())):
            loop.call_soon(callback, message)

    async def subscribe(self, channel: str, on_message: OnMessage) -> None:
        self._subscribers.setdefault(channel, []).append(on_message)

    async def close(self) -> None:
        self._subscribers.clear()
