"""Access to a room's channel ends when membership ends (issue 13): a /ws subscription
to room:<id> stopped receiving nothing after the user left the room over HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.integration.arena_support import User, sqlite_settings
from tests.integration.realtime_support import WIRE, WS, Served, served_arena


async def _room(srv: Served, owner: User, *members: User) -> str:
    r = await srv.arena.client.post("/rooms", json={"name": "lobby"}, headers=owner.headers)
    assert r.status_code == 201, r.text
    room = str(r.json()["id"])
    for m in members:
        r = await srv.arena.client.post(f"/rooms/{room}/join", headers=m.headers)
        assert r.status_code == 200, r.text
    return room


async def _post(srv: Served, user: User, room: str, body: str) -> None:
    r = await srv.arena.client.post(
        f"/rooms/{room}/messages", json={"body": body}, headers=user.headers
    )
    assert r.status_code == 201, r.text


async def _leave(srv: Served, user: User, room: str) -> None:
    r = await srv.arena.client.post(f"/rooms/{room}/leave", headers=user.headers)
    assert r.status_code == 204, r.text


async def _bodies_after_leave(
    stayer: WS, leaver: WS, srv: Served, owner: User, room: str
) -> list[dict[str, Any]]:
    """Post three messages; the stayer gets them all; what the leaver got meanwhile."""
    ch = f"room:{room}"
    for i in range(3):
        await _post(srv, owner, room, f"after-{i}")
    for i in range(3):
        assert (await stayer.next("msg", ch=ch, timeout_s=10))["data"]["body"] == f"after-{i}"
    return [f for f in await leaver.drain(0.3) if f.get("op") == "msg"]


async def test_leaving_over_http_ends_the_ws_subscription(tmp_path: Path) -> None:
    async with served_arena(sqlite_settings(tmp_path / "rt"), WIRE) as srv:
        alice = await srv.arena.signup("alice")
        bob = await srv.arena.signup("bob")
        room = await _room(srv, alice, bob)
        ch = f"room:{room}"
        async with srv.ws(alice) as wa, srv.ws(bob) as wb:
            await wa.request("sub", ch=ch)
            await wb.request("sub", ch=ch)
            await _post(srv, alice, room, "before")
            for ws in (wa, wb):
                assert (await ws.next("msg", ch=ch, timeout_s=10))["data"]["body"] == "before"
            await _leave(srv, bob, room)
            # the client is told, without asking
            told = await wb.next("unsub", ch=ch, timeout_s=5)
            assert told == {"op": "unsub", "ch": ch, "reason": "revoked"}
            assert await _bodies_after_leave(wa, wb, srv, alice, room) == []
            # still connected: other channels work, and a new sub is refused
            assert (await wb.request("ping"))["op"] == "pong"
            refused = await wb.request("sub", ch=ch)
            assert refused["op"] == "error" and refused["code"] == "forbidden"
            unsub = await wb.request("unsub", ch=ch)
            assert unsub["code"] == "not_subscribed"  # the server already ended it
            pres = await wa.request("presence", ch=ch)
            assert [m["user"] for m in pres["members"]] == [alice.id]


async def test_the_periodic_recheck_ends_access_when_the_signal_is_lost(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path / "rt", realtime_reauthorize_interval_s=0.2)
    async with served_arena(settings, WIRE) as srv:
        hub = srv.runtime.realtime

        async def lost(channel: str, user: str) -> int:
            return 0

        hub.revoke = lost  # the leave handler's call and the consumer's: both lost
        alice = await srv.arena.signup("alice")
        bob = await srv.arena.signup("bob")
        room = await _room(srv, alice, bob)
        ch = f"room:{room}"
        async with srv.ws(alice) as wa, srv.ws(bob) as wb:
            await wa.request("sub", ch=ch)
            await wb.request("sub", ch=ch)
            await _leave(srv, bob, room)
            told = await wb.next("unsub", ch=ch, timeout_s=5)
            assert told["reason"] == "forbidden"
            assert await _bodies_after_leave(wa, wb, srv, alice, room) == []
            # members keep their subscription through every pass
            assert ch in next(c for c in hub.connections if c.user == alice.id).channels


@contextlib.asynccontextmanager
async def _two_nodes(tmp_path: Path, nats_url: str) -> AsyncIterator[tuple[Served, Served]]:
    settings = sqlite_settings(tmp_path / "rt", events_url=nats_url)
    async with served_arena(settings) as a, served_arena(settings) as b:
        yield a, b


async def test_leaving_on_one_node_ends_subscriptions_on_the_other(
    tmp_path: Path, nats_url: str
) -> None:
    async with _two_nodes(tmp_path, nats_url) as (a, b):
        alice = await a.arena.signup("alice")
        bob = await a.arena.signup("bob")
        room = await _room(a, alice, bob)
        ch = f"room:{room}"
        async with a.ws(alice) as wa, b.ws(bob) as wb, b.ws(bob) as wb2:
            await wa.request("sub", ch=ch)
            await wb.request("sub", ch=ch)
            await wb2.request("sub", ch=ch)
            await _post(a, alice, room, "before")
            for ws in (wa, wb, wb2):
                assert (await ws.next("msg", ch=ch, timeout_s=10))["data"]["body"] == "before"
            await _leave(a, bob, room)  # over HTTP on node A; bob's sockets are on node B
            for ws in (wb, wb2):
                assert (await ws.next("unsub", ch=ch, timeout_s=5))["reason"] == "revoked"
            assert await _bodies_after_leave(wa, wb, a, alice, room) == []
            assert [f for f in await wb2.drain(0.2) if f.get("op") == "msg"] == []
            assert not b.runtime.realtime.channels.get(ch)
