"""One client per server per process: the runtime's capabilities share Redis and NATS.

Connections are counted from the kernel's side (this process's ESTABLISHED TCP
sockets to the server's port, from /proc), not from our own bookkeeping.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tenfold.clients.nats import nats_clients
from tenfold.clients.redis import redis_clients
from tenfold.gateway import Runtime
from tenfold.limits import Rule
from tests.integration.arena_support import sqlite_settings
from tests.services import NatsServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def sockets_to(port: int) -> set[str]:
    """This process's established TCP connections whose remote port is `port` (inodes)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in mine:
                    found.add(fields[9])
    return found


async def test_cache_and_limits_share_one_redis_client(redis_url: str, tmp_path: Path) -> None:
    port = urlsplit(redis_url).port or 6379
    before = sockets_to(port)
    settings = sqlite_settings(
        tmp_path, cache_url=redis_url, limits_url=redis_url, cache_prefix="tftest-shared"
    )
    runtime = Runtime(settings)
    await runtime.start()
    try:
        l2, storage = runtime.cache.l2, runtime.limiter.storage
        assert l2.client is storage.client  # type: ignore[attr-defined]
        assert redis_clients.open_clients(redis_url) == [l2.client]  # type: ignore[attr-defined]
        await l2.get("tftest-shared:nothing")
        assert (await storage.decide("tftest-shared:k", Rule(limit=5, period_s=1.0))).allowed
        # one command socket for both, plus the cache's invalidation subscriber
        # (a subscribed connection cannot run commands); was 3 with a client each.
        # Counted as new sockets: other tests' connections may come and go.
        opened = sockets_to(port) - before
        assert len(opened) == 2
    finally:
        await runtime.stop()
    assert redis_clients.open_clients(redis_url) == []  # the last holder closed it
    await asyncio.sleep(0.05)
    assert not opened & sockets_to(port)  # all closed


async def test_events_and_realtime_share_one_nats_connection(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    settings = sqlite_settings(tmp_path, events_url=url)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        events, broker = runtime.bus.backend, runtime.realtime.broker
        assert events.client is not None  # type: ignore[attr-defined]
        assert events.client is broker.client  # type: ignore[attr-defined]
        assert nats_clients.open_clients(url) == [events.client]  # type: ignore[attr-defined]
        assert len(sockets_to(nats_server.port)) == 1  # was 2: one per capability
    finally:
        await runtime.stop()
    assert nats_clients.open_clients(url) == []
    await asyncio.sleep(0.05)
    assert not sockets_to(nats_server.port)


async def test_a_redis_client_is_closed_by_its_last_release(redis_url: str) -> None:
    a = redis_clients.acquire(redis_url)
    b = redis_clients.acquire(redis_url)
    assert a is b and a.refs == 2
    assert await a.commands.execute("PING") == b"PONG"
    await redis_clients.release(a)
    assert not a.closed and await b.commands.execute("PING") == b"PONG"
    await redis_clients.release(b)
    assert a.closed and redis_clients.open_clients(redis_url) == []
    await redis_clients.release(b)  # once too often: harmless
    c = redis_clients.acquire(redis_url)
    assert c is not a  # a new one after the close
    await redis_clients.release(c)


async def test_a_nats_connection_is_shared_and_closed_by_its_last_release(
    nats_server: NatsServer,
) -> None:
    first, second = await asyncio.gather(
        nats_clients.acquire(nats_server.url), nats_clients.acquire(nats_server.url)
    )
    assert first is second and first.refs == 2  # concurrent acquires: one connect
    assert len(sockets_to(nats_server.port)) == 1
    await nats_clients.release(first)
    assert second.nc.is_connected
    await nats_clients.release(second)
    assert first.nc is None and nats_clients.open_clients(nats_server.url) == []


async def test_an_unreachable_nats_is_broker_unavailable_and_holds_nothing() -> None:
    from tenfold.errors import BrokerUnavailable

    url = "nats://127.0.0.1:1"
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1"):
        await nats_clients.acquire(url, connect_timeout_s=0.2)
    assert nats_clients.open_clients(url) == []
