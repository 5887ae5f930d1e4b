"""A second OS process for the cluster-lock test.

Usage: python cache_lock_peer.py REDIS_URL PREFIX KEY CALLS_FILE CALLERS

Opens a TieredCache with `cluster_lock=True` (its own L1 and Redis client),
prints `ready` once subscribed, waits for a line on stdin, then makes CALLERS
concurrent `get_or_load(KEY)` calls. Its loader appends one line to CALLS_FILE
(the "database" counts its queries) and takes 0.3 s. Prints `done <distinct
values>` and exits.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tenfold.cache import L1Cache, TieredCache
from tenfold.cache.redis import RedisL2


def record_call(calls: Path) -> None:
    fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


async def main(url: str, prefix: str, key: str, calls: Path, callers: int) -> None:
    cache = TieredCache(
        L1Cache(), RedisL2(url, timeout_s=2.0), prefix=prefix, cluster_lock=True, lock_ttl_s=5.0
    )

    async def load() -> dict[str, str]:
        record_call(calls)
        await asyncio.sleep(0.3)
        return {"loaded_by": "a process"}

    await cache.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    results = await asyncio.gather(*(cache.get_or_load(key, load) for _ in range(callers)))
    print("done", len({str(r) for r in results}), flush=True)
    await cache.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])))
