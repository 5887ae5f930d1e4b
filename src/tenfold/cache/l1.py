"""The in-process L1: serialised entries bounded by count and by total bytes, TTL + LRU.

Invariants:
- `len(self) <= max_entries` and `self.total_bytes <= max_bytes` after every call.
- An entry is never returned at or after its expiry (`clock() >= expires_at`).
- Over a bound, the least recently used entries are evicted first.

Entries are bytes (the same envelope the L2 stores), so the byte bound is the
size of what is held, and callers never share a mutable object through the cache.
An entry may also carry `meta`, an object its writer decoded from the bytes once
(TieredCache keeps the envelope's times and the value there, so a hit does not
decode the whole envelope again); the writer declares `meta_bytes`, what that
object holds beyond the payload, and the byte bound counts it.
Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tenfold.errors import ConfigError

__all__ = ["L1Cache", "L1Entry"]


@dataclass(slots=True)
class L1Entry:
    """One held entry: the payload, its expiry, its tags, and the writer's decoded `meta`."""

    payload: bytes
    expires_at: float
    tags: frozenset[str]
    meta: Any
    size: int


class L1Cache:
    """A bounded in-memory map of key → bytes with per-entry TTL and LRU eviction.

    Args:
        max_entries: bound on the number of entries.
        max_bytes: bound on the sum of the entries' payload sizes; a payload
            larger than this on its own is not stored.
        clock: monotonic seconds (tests pass a fake clock).
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ConfigError("cache l1 max_entries", f"must be >= 1, got {max_entries!r}")
        if max_bytes < 1:
            raise ConfigError("cache l1 max_bytes", f"must be >= 1, got {max_bytes!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.total_bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, L1Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> bytes | None:
        """The payload for `key`, or None if absent or expired; a hit becomes most recent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() >= entry.expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.payload

    def entry(self, key: str) -> L1Entry | None:
        """Like `get`, but the whole entry (payload and `meta`); do not mutate it."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() >= entry.expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(
        self,
        key: str,
        payload: bytes,
        ttl_s: float,
        tags: Iterable[str] = (),
        *,
        meta: Any = None,
        meta_bytes: int = 0,
    ) -> bool:
        """Store `payload` for `ttl_s` seconds; False (and nothing stored) if it cannot fit.

        `meta` is kept with the payload and returned by `entry`; `meta_bytes` is
        its size beyond the payload, counted against `max_bytes`.
        """
        self._drop(key)
        size = len(payload) + max(0, meta_bytes)
        if ttl_s <= 0 or size > self.max_bytes:
            return False
        self._entries[key] = L1Entry(payload, self.clock() + ttl_s, frozenset(tags), meta, size)
        self.total_bytes += size
        if len(self._entries) > self.max_entries or self.total_bytes > self.max_bytes:
            self._evict()
        return True

    def delete(self, key: str) -> bool:
        """Drop `key`; True if it was held."""
        return self._drop(key)

    def delete_tag(self, tag: str) -> int:
        """Drop every entry stored with `tag`; how many were dropped (a scan: L1 is bounded)."""
        keys = [key for key, entry in self._entries.items() if tag in entry.tags]
        for key in keys:
            self._drop(key)
        return len(keys)

    def clear(self) -> None:
        """Drop everything."""
        self._entries.clear()
        self.total_bytes = 0

    def _drop(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.total_bytes -= entry.size
        return True

    def _evict(self) -> None:
        # Least recently used first; no scan for expired entries (O(n) per insert):
        # an expired entry is dropped when read, or reaches the LRU end like any other.
        while len(self._entries) > self.max_entries or self.total_bytes > self.max_bytes:
            key = next(iter(self._entries))  # least recently used
            self._drop(key)
            self.evictions += 1
