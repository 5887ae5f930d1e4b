"""Tiered caching: an in-process L1, a shared L2 (memory or Redis), and a loader.

cache = TieredCache(L1Cache(), from_url("redis://127.0.0.1:6379/0"), prefix="arena")
room = await cache.get_or_load(f"room:{room_id}", lambda: load_room(room_id),
                               ttl_s=30, stale_ttl_s=10, tags=[f"user:{owner}"])
await cache.invalidate(f"room:{room_id}")   # L2 deleted, every process's L1 dropped
await cache.warm_keys(room_keys, load_room_by_key, concurrency=16)

Options: probabilistic early refresh (`early_refresh_beta`), a cluster-wide
single-flight lock (`cluster_lock=True`, `lock_ttl_s`); see docs/cache.md.

Invalidation propagation bound: while Redis pub/sub is connected, every
process drops its L1 copy one Redis hop after `invalidate` returns
(milliseconds); while it is not, an L1 copy lives at most `l1_max_ttl_s` and
each L1 is cleared on reconnect. See `tenfold.cache.tiered` for the details.
"""

from __future__ import annotations

from tenfold.cache.base import L2Backend, OnMessage, from_url
from tenfold.cache.l1 import L1Cache
from tenfold.cache.memory import MemoryL2
from tenfold.cache.tiered import Loader, TieredCache, WarmReport, slot_tag

__all__ = [
    "L1Cache",
    "L2Backend",
    "Loader",
    "MemoryL2",
    "OnMessage",
    "TieredCache",
    "WarmReport",
    "from_url",
    "slot_tag",
]
