"""The per-user connection limit on NATS admits exactly `limit` under a burst (issue 13:
500 WebSocket connections opened at once by one user were all closed with 4008)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tenfold.realtime.nats import NatsBroker
from tests.integration.arena_support import sqlite_settings
from tests.integration.realtime_support import served_arena
from tests.integration.support import wait_until


def _broker(url: str, ttl_s: float = 30.0) -> NatsBroker:
    return NatsBroker(url, presence_ttl_s=ttl_s)


async def test_a_burst_of_500_on_two_nodes_admits_exactly_the_limit(nats_url: str) -> None:
    a, b = _broker(nats_url), _broker(nats_url)
    await a.start(lambda *f: None)
    await b.start(lambda *f: None)
    user = f"burst-{secrets.token_hex(4)}"
    try:
        conns = [f"c{i}" for i in range(500)]
        got = await asyncio.gather(
            *((a if i % 2 else b).conn_acquire(user, conn, 20) for i, conn in enumerate(conns))
        )
        admitted = [c for c, ok in zip(conns, got, strict=True) if ok]
        assert len(admitted) == 20
        # a freed slot is free again, once; the heartbeat does not free or add any
        first = admitted[0]
        owner = a if conns.index(first) % 2 else b
        await a.refresh([], [(user, c) for c in admitted])
        await b.refresh([], [(user, c) for c in admitted])
        assert not await a.conn_acquire(user, "late", 20)
        await owner.conn_release(user, first)
        again = await asyncio.gather(*(a.conn_acquire(user, f"r{i}", 20) for i in range(30)))
        assert again.count(True) == 1
    finally:
        await a.close()
        await b.close()


async def test_slots_of_a_crashed_node_expire(nats_url: str) -> None:
    a = _broker(nats_url, ttl_s=1.0)
    await a.start(lambda *f: None)
    user = f"crash-{secrets.token_hex(4)}"
    try:
        assert all(await asyncio.gather(*(a.conn_acquire(user, f"c{i}", 3) for i in range(3))))
        assert not await a.conn_acquire(user, "c3", 3)
        # no heartbeat, no release: the node is gone; its slots drop out after the TTL
        await wait_until(lambda: a.conn_acquire(user, "c4", 3), timeout_s=10, what="a slot")
    finally:
        await a.close()


async def test_a_websocket_burst_of_one_user_admits_exactly_the_limit(
    tmp_path: Path, nats_url: str
) -> None:
    settings = sqlite_settings(tmp_path / "rt", events_url=nats_url, realtime_max_conns_per_user=5)
    async with served_arena(settings) as srv:
        alice = await srv.arena.signup("alice")

        async def open_one() -> int | None:
            """None while the socket is admitted and open, else its close code."""
            async with connect(srv.url(f"token={alice.access}")) as ws:
                try:
                    async with asyncio.timeout(3):
                        await ws.recv()  # the ok frame, or the close
                        await ws.recv()  # nothing more comes to an admitted socket
                except TimeoutError:
                    return None
                except ConnectionClosed as exc:
                    return exc.rcvd.code if exc.rcvd is not None else -1
            return -1

        codes = await asyncio.gather(*(open_one() for _ in range(100)))
        assert codes.count(None) == 5, codes
        assert codes.count(4008) == 95, codes
