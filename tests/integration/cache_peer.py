"""A second OS process for the cross-process invalidation test.

Usage: python cache_peer.py REDIS_URL PREFIX KEY SOURCE_FILE

Caches KEY through its own L1 and the shared Redis L2; its loader reads
SOURCE_FILE (the "database"). Prints `ready <value>` once subscribed and
cached, then polls every 2 ms and prints `changed <wall time> <value>` when
the value it serves changes, and exits (or after 20 s).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from tenfold.cache import L1Cache, TieredCache
from tenfold.cache.redis import RedisL2


async def main(url: str, prefix: str, key: str, source: Path) -> None:
    cache = TieredCache(
        L1Cache(), RedisL2(url, timeout_s=2.0), prefix=prefix, ttl_s=60, l1_max_ttl_s=60
    )

    async def load() -> str:
        return await asyncio.to_thread(source.read_text)

    await cache.start()
    first = await cache.get_or_load(key, load)
    print("ready", first, flush=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        value = await cache.get_or_load(key, load)
        if value != first:
            print("changed", repr(time.time()), value, flush=True)
            break
        await asyncio.sleep(0.002)
    await cache.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
