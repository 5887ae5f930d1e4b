"""The limiter storage interface and the URL → storage factory.

Contract every `LimiterStorage` keeps (the shared suite in
tests/integration/test_limits_storages.py runs it against each):

- `decide(key, rule, cost)` applies GCRA (`tenfold.limits.gcra`) to the TAT
  stored under `key`, atomically: concurrent callers on the same key, from any
  process sharing the storage, never together exceed the rule.
- A denied request changes nothing; an allowed one moves the key's TAT.
- Keys vanish by themselves once their bucket is full again (TTL or eviction).
- `decide_many(items)` equals calling `decide` on each item in order, in one
  batch (one round trip for Redis).
- Every call returns within the storage's timeout; what happens when the
  server is down or slow is the storage's `on_error` policy, never an
  exception or an unbounded wait.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from tenfold import backends
from tenfold.limits.gcra import Decision
from tenfold.limits.rules import Rule

__all__ = ["DecideItem", "LimiterStorage", "from_url"]

DecideItem = tuple[str, Rule, int]
"""One batched check: (key, rule, cost)."""


class LimiterStorage(abc.ABC):
    """Where the TATs of rate-limited subjects live."""

    @abc.abstractmethod
    async def decide(self, key: str, rule: Rule, cost: int = 1) -> Decision:
        """Apply `rule` to `key` for a request costing `cost`.

        Args:
            key: the subject's key (the storage may add its own prefix).
            rule: the rule to apply.
            cost: how many requests this one counts for (>= 1).
        """

    def decide_now(self, key: str, rule: Rule, cost: int = 1) -> Decision | None:
        """`decide` without awaiting, when this storage decides in-process; else None
        (the caller then awaits `decide`). The memory storage overrides it."""
        return None

    async def decide_many(self, items: Sequence[DecideItem]) -> list[Decision]:
        """Decide every (key, rule, cost) in `items`, in order, as one batch.

        Args:
            items: the checks, each a (key, rule, cost) tuple.
        """
        return [await self.decide(key, rule, cost) for key, rule, cost in items]

    async def close(self) -> None:
        """Release connections; the storage must not be used afterwards."""
        return None  # nothing to release by default


def from_url(url: str, **options: Any) -> LimiterStorage:
    """The storage for `memory://` or `redis://host:port/db` (also `rediss://`).

    Args:
        url: the storage URL; its scheme picks the backend.
        options: keyword options for that backend's constructor.

    Raises:
        ConfigError: for a scheme `tenfold.backends` does not know (it lists those it does).
    """
    cls = backends.backend_class("limits", url)
    result: LimiterStorage = cls.from_url(url, **options)
    return result
