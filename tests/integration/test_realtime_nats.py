"""The hub across nodes on NATS: two arena servers (one database, one NATS)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.integration.arena_support import User, sqlite_settings
from tests.integration.realtime_support import WS, Served, served_arena
from tests.integration.support import wait_until


@contextlib.asynccontextmanager
async def _two_nodes(
    tmp_path: Path, nats_url: str, **overrides: Any
) -> AsyncIterator[tuple[Served, Served]]:
    settings = sqlite_settings(tmp_path / "rt", events_url=nats_url, **overrides)
    async with served_arena(settings) as a, served_arena(settings) as b:
        yield a, b


async def _room(srv: Served, owner: User, *members: User) -> str:
    r = await srv.arena.client.post("/rooms", json={"name": "lobby"}, headers=owner.headers)
    assert r.status_code == 201, r.text
    room = str(r.json()["id"])
    for m in members:
        r = await srv.arena.client.post(f"/rooms/{room}/join", headers=m.headers)
        assert r.status_code == 200, r.text
    return room


async def test_two_nodes_fan_out_presence_limits_and_failover(
    tmp_path: Path, nats_url: str
) -> None:
    async with _two_nodes(tmp_path, nats_url, realtime_max_conns_per_user=2) as (a, b):
        alice = await a.arena.signup("alice")
        bob = await a.arena.signup("bob")
        room = await _room(a, alice, bob)
        ch = f"room:{room}"
        async with a.ws(alice) as wa, b.ws(bob) as wb:
            ok_a = await wa.request("sub", ch=ch, join_leave=True)
            ok_b = await wb.request("sub", ch=ch)
            assert ok_a["epoch"] == ok_b["epoch"]
            # a committed message reaches both nodes' clients, whichever node consumed it
            r = await a.arena.client.post(
                f"/rooms/{room}/messages", json={"body": "hi all"}, headers=alice.headers
            )
            assert r.status_code == 201, r.text
            ma = await wa.next("msg", ch=ch, timeout_s=10)
            mb = await wb.next("msg", ch=ch, timeout_s=10)
            assert ma == mb and ma["data"]["body"] == "hi all" and ma["offset"] > ok_a["offset"]
            # ephemeral from node B reaches node A
            await wb.request("pub", ch=ch, data={"typing": "bob"}, ephemeral=True)
            t = await wa.next("msg", ch=ch, ephemeral=True)
            assert t["data"] == {"typing": "bob"}
            # presence spans both nodes; join events cross too
            assert {"user": bob.id, "name": "bob"} in (await _event(wa, "join", ch, bob.id))[
                "users"
            ]
            for ws in (wa, wb):
                pres = await ws.request("presence", ch=ch)
                assert {m["user"] for m in pres["members"]} == {alice.id, bob.id}
            # connections per user, cluster-wide: alice has one on A, a second on B is
            # fine, a third anywhere is refused
            async with b.ws(alice) as second:
                assert (await second.request("ping"))["op"] == "pong"
                async with a.ws() as third:
                    await third.send({"op": "auth", "token": alice.access})
                    assert await third.close_code() == 4008
            # node B goes away: bob is told to reconnect elsewhere (1001) ...
            position = {"epoch": mb["epoch"], "offset": mb["offset"]}
            await b.runtime.realtime.stop()
            assert await wb.close_code() == 1001
            await wait_until(lambda: _members(wa, ch, {alice.id}), what="bob to leave the presence")
            # ... misses messages, and recovers them from history on node A
            for i in range(3):
                r = await a.arena.client.post(
                    f"/rooms/{room}/messages", json={"body": f"m{i}"}, headers=alice.headers
                )
                assert r.status_code == 201
            for i in range(3):
                assert (await wa.next("msg", ch=ch, timeout_s=10))["data"]["body"] == f"m{i}"
            async with a.ws(bob) as wb2:
                ok = await wb2.request("sub", ch=ch, since=position)
                assert ok["recovered"] is True, ok
                got = [await wb2.next("msg", ch=ch) for _ in range(3)]
                assert [m["data"]["body"] for m in got] == ["m0", "m1", "m2"]
                offsets = [m["offset"] for m in got]
                assert offsets == sorted(offsets) and offsets[0] > position["offset"]
                stale = await wb2.request(
                    "sub", ch=f"user:{bob.id}", since={"epoch": "0", "offset": 1}
                )
                assert stale["recovered"] is False


async def _members(ws: WS, ch: str, expected: set[str]) -> bool:
    pres = await ws.request("presence", ch=ch)
    return {m["user"] for m in pres["members"]} == expected


async def test_presence_of_a_crashed_node_expires(tmp_path: Path, nats_url: str) -> None:
    """A node that dies without cleaning up: its entries drop out after the TTL."""
    async with _two_nodes(tmp_path, nats_url, realtime_presence_ttl_s=1.0) as (a, b):
        alice = await a.arena.signup("alice")
        bob = await a.arena.signup("bob")
        room = await _room(a, alice, bob)
        ch = f"room:{room}"
        async with a.ws(alice) as wa, b.ws(bob) as wb:
            await wa.request("sub", ch=ch)
            await wb.request("sub", ch=ch)
            assert await _members(wa, ch, {alice.id, bob.id})
            hub = b.runtime.realtime
            # simulate a crash: stop heartbeats and forget cleanup on node B
            assert hub._heartbeat is not None
            hub._heartbeat.cancel()
            hub.broker.presence_remove = _noop
            hub.broker.conn_release = _noop
            await wait_until(
                lambda: _members(wa, ch, {alice.id}), timeout_s=15, what="bob's entry to expire"
            )
            assert await _members(wa, ch, {alice.id})


async def _noop(*args: object) -> None:
    return None


async def test_nats_history_chain_detects_expired_gaps(nats_url: str) -> None:
    """Offsets are stream sequences (not contiguous); a gap that fell out is not 'recovered'."""
    import secrets

    from tenfold.realtime.nats import NatsBroker

    got: list[tuple[str, int | None, str]] = []
    a = NatsBroker(nats_url, history_size=3, history_ttl_s=60, presence_ttl_s=5)
    b = NatsBroker(nats_url, history_size=3, history_ttl_s=60, presence_ttl_s=5)
    await a.start(lambda *f: None)
    await b.start(lambda ch, off, text, at: got.append((ch, off, text)))
    try:
        ch = f"t:{secrets.token_hex(4)}"
        other = f"t:{secrets.token_hex(4)}"
        await b.subscribe(ch)
        offsets = []
        for n in range(3):  # two nodes interleave stores on one channel: one chain
            offsets.append(await (a if n % 2 else b).publish(ch, str(n).encode()))
            await a.publish(other, b"0")  # shares the stream sequence
        assert offsets == sorted(offsets) and offsets[1] - offsets[0] > 1
        await wait_until(lambda: len(got) == 3, what="live delivery on node b")
        assert [off for _, off, _ in got] == offsets
        pos = await a.position(ch)
        assert pos.offset == offsets[-1] and pos.epoch == b.epoch
        replay = await a.since(ch, pos.epoch, 0)
        assert replay is not None and [o for o, _ in replay] == offsets
        assert [o for o, _ in await b.since(ch, pos.epoch, offsets[0]) or []] == offsets[1:]
        assert await a.since(ch, pos.epoch, offsets[-1]) == []
        assert await a.since(ch, "stale", offsets[0]) is None
        await b.publish(ch, b"3")  # the first message falls out (3 per channel)
        assert await a.since(ch, pos.epoch, 0) is None
        assert await a.since(ch, pos.epoch, offsets[0]) is not None
    finally:
        await a.close()
        await b.close()


async def test_join_leave_once_per_user_across_nodes(tmp_path: Path, nats_url: str) -> None:
    """bob on both nodes: closing one connection is no leave; closing the last one is."""
    async with _two_nodes(tmp_path, nats_url) as (a, b):
        alice = await a.arena.signup("alice")
        bob = await a.arena.signup("bob")
        room = await _room(a, alice, bob)
        ch = f"room:{room}"
        async with a.ws(alice) as wa:
            await wa.request("sub", ch=ch, join_leave=True)
            async with a.ws(bob) as on_a:
                await on_a.request("sub", ch=ch)
                await _event(wa, "join", ch, bob.id)
                async with b.ws(bob) as on_b:
                    await on_b.request("sub", ch=ch)
                    await wa.drain(0.3)
                assert not [f for f in await wa.drain(0.5) if f["op"] == "leave"]
            leave = await _event(wa, "leave", ch, bob.id)
            assert leave["users"] == [{"user": bob.id, "name": "bob"}]


async def _event(ws: WS, op: str, ch: str, user: str) -> dict[str, Any]:
    """The next `op` (join/leave) frame of `ch` that lists `user` (frames are coalesced)."""
    async with asyncio.timeout(5):
        while True:
            f = await ws.next(op, ch=ch)
            if any(u["user"] == user for u in f["users"]):
                return f
