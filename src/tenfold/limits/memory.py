"""In-process limiter storage: a bounded LRU dict of key → TAT.

Bounds: at most `max_keys` keys. When full, keys whose TAT has passed (a full
bucket, the same as an unknown key) are dropped first from the least recently
used end, then the least recently used key. Dropping a live key can only
forgive a subject, never refuse one wrongly.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tenfold.errors import ConfigError
from tenfold.limits import gcra
from tenfold.limits.base import DecideItem, LimiterStorage
from tenfold.limits.rules import Rule

__all__ = ["MemoryStorage"]

# How many least-recently-used keys one insert may inspect for expiry before it
# evicts a live one: keeps the cost of a full table bounded per request.
_EXPIRY_SCAN = 8


class MemoryStorage(LimiterStorage):
    """TATs in this process only; each process enforces its own limit.

    Args:
        max_keys: the bound on remembered subjects (>= 1).
        clock: seconds, e.g. `time.time`; tests pass a fake clock.
    """

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigError(
                "memory limiter max_keys", f"must be an integer >= 1, got {max_keys!r}"
            )
        self.max_keys = max_keys
        self.clock = clock
        self._tats: OrderedDict[str, float] = OrderedDict()
        self.evicted_live = 0  # live keys dropped to keep the bound (a metric to watch)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStorage:
        """`memory://` or `memory://?max_keys=50000`."""
        query = dict(parse_qsl(urlsplit(url).query))
        if "max_keys" in query and "max_keys" not in options:
            try:
                options["max_keys"] = int(query["max_keys"])
            except ValueError:
                raise ConfigError(
                    f"limiter URL {url!r}",
                    f"max_keys must be an integer, got {query['max_keys']!r}",
                ) from None
        return cls(**options)

    def __len__(self) -> int:
        return len(self._tats)

    def decide_now(self, key: str, rule: Rule, cost: int = 1) -> gcra.Decision:
        """`decide` without the coroutine: nothing here blocks."""
        now = self.clock()
        tats = self._tats
        new_tat, decision = gcra.decide(tats.get(key), now, rule, cost)
        if key in tats:
            tats.move_to_end(key)  # a denied key is hot too: keep it, or it is forgiven
        if decision.allowed and new_tat is not None:
            if key not in tats:
                self._make_room(now)
            tats[key] = new_tat
        return decision

    async def decide(self, key: str, rule: Rule, cost: int = 1) -> gcra.Decision:
        return self.decide_now(key, rule, cost)

    async def decide_many(self, items: Sequence[DecideItem]) -> list[gcra.Decision]:
        return [self.decide_now(key, rule, cost) for key, rule, cost in items]

    def purge_expired(self) -> int:
        """Drop every key whose bucket is full again; return how many were dropped."""
        now = self.clock()
        expired = [key for key, tat in self._tats.items() if tat <= now]
        for key in expired:
            del self._tats[key]
        return len(expired)

    def _make_room(self, now: float) -> None:
        tats = self._tats
        if len(tats) < self.max_keys:
            return
        oldest = itertools.islice(tats.items(), _EXPIRY_SCAN)  # least recently used first
        for key in [key for key, tat in oldest if tat <= now]:
            del tats[key]
        while len(tats) >= self.max_keys:
            tats.popitem(last=False)
            self.evicted_live += 1
