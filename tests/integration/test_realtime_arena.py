"""The /ws hub in embedded mode, driven against arena served by a real uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tenfold.realtime.connection import QueuedConnection
from tenfold.realtime.wire import WireConnection
from tests.integration.arena_support import User, sqlite_settings
from tests.integration.realtime_support import ASGI, WIRE, Served, served_arena
from tests.integration.support import wait_until


@pytest.fixture(params=[WIRE, ASGI], ids=["wire", "asgi"])
def ws_impl(request: pytest.FixtureRequest) -> str:
    """Every test runs on tenfold's uvicorn protocol and on the ASGI path."""
    return str(request.param)


@pytest.fixture
async def srv(
    tmp_path: Path, request: pytest.FixtureRequest, ws_impl: str
) -> AsyncIterator[Served]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    async with served_arena(sqlite_settings(tmp_path / "rt", **overrides), ws_impl) as s:
        yield s


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


# -- auth ----------------------------------------------------------------------


@pytest.mark.parametrize("srv", [{"realtime_auth_timeout_s": 0.3}], indirect=True)
async def test_auth_frame_query_token_and_refusals(srv: Served, ws_impl: str) -> None:
    alice = await srv.arena.signup("alice")
    async with srv.ws(alice) as ws:
        assert (await ws.request("ping")) == {"op": "pong", "ref": 2}
        [conn] = srv.runtime.realtime.connections
        assert type(conn) is (WireConnection if ws_impl == WIRE else QueuedConnection)
    # ?token= on the URL: authenticated at once, the ok frame has no ref
    async with srv.ws(None, additional_headers={}) as _:
        pass
    from websockets.asyncio.client import connect

    async with connect(srv.url(f"token={alice.access}")) as conn:
        ok = orjson.loads(await conn.recv())
        assert ok["op"] == "ok" and ok["user"] == alice.id and ok["conn"]
    async with srv.ws() as ws:
        await ws.send({"op": "auth", "token": "not-a-token", "ref": 1})
        assert await ws.close_code() == 4001
    async with connect(srv.url("token=garbage")) as conn:
        from tests.integration.realtime_support import WS

        assert await WS(conn).close_code() == 4001
    async with srv.ws() as ws:  # the first frame must be auth
        await ws.send({"op": "sub", "ch": "user:1", "ref": 1})
        assert await ws.close_code() == 4001
    async with srv.ws() as ws:  # nothing within the auth timeout
        assert await ws.close_code() == 4001


# -- authorization, fan-out of committed messages ----------------------------------


async def test_room_messages_reach_members_with_growing_offsets(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    bob = await srv.arena.signup("bob")
    carol = await srv.arena.signup("carol")
    room = await _room(srv, alice, bob)
    ch = f"room:{room}"
    async with srv.ws(bob) as wb, srv.ws(carol) as wc:
        ok = await wb.request("sub", ch=ch)
        assert ok["op"] == "ok" and ok["ch"] == ch and ok["offset"] == 0 and ok["epoch"]
        denied = await wc.request("sub", ch=ch)  # not a member
        assert denied["op"] == "error" and denied["code"] == "forbidden"
        denied = await wc.request("sub", ch=f"user:{bob.id}")  # someone else's channel
        assert denied["code"] == "forbidden"
        assert (await wc.request("sub", ch=f"user:{carol.id}"))["op"] == "ok"
        # clients cannot publish stored messages into a room: they go through the API
        denied = await wb.request("pub", ch=ch, data={"body": "sneaky"})
        assert denied["code"] == "forbidden"
        for i in range(3):
            await _post(srv, alice, room, f"hello {i}")
        msgs = [await wb.next("msg", ch=ch) for _ in range(3)]
        assert [m["data"]["body"] for m in msgs] == ["hello 0", "hello 1", "hello 2"]
        offsets = [m["offset"] for m in msgs]
        assert offsets == sorted(offsets) and len(set(offsets)) == 3
        assert all(m["epoch"] == ok["epoch"] for m in msgs)
        assert set(msgs[0]["data"]) == {"id", "room_id", "author", "body", "created_at"}
        assert msgs[0]["data"]["author"] == "alice"
        # after joining, carol may subscribe (the membership cache was invalidated)
        r = await srv.arena.client.post(f"/rooms/{room}/join", headers=carol.headers)
        assert r.status_code == 200
        assert (await wc.request("sub", ch=ch))["op"] == "ok"


async def test_wallet_credit_reaches_the_user_channel(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    bob = await srv.arena.signup("bob")
    async with srv.ws(bob) as wb:
        assert (await wb.request("sub", ch=f"user:{bob.id}"))["op"] == "ok"
        r = await srv.arena.transfer(alice, "bob", 25)
        assert r.status_code in (201, 202), r.text
        # bob's own sign-up bonus may still be on its way to this channel
        m = await wb.next("msg", ch=f"user:{bob.id}", timeout_s=10)
        if m["data"] == {"kind": "points", "delta": 1000}:
            m = await wb.next("msg", ch=f"user:{bob.id}", timeout_s=10)
        assert m["data"] == {"kind": "points", "delta": 25}


# -- recovery ------------------------------------------------------------------------


async def test_recovery_after_reconnect_and_stale_epoch(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    room = await _room(srv, alice)
    ch = f"room:{room}"
    async with srv.ws(alice) as ws:
        ok = await ws.request("sub", ch=ch)
        await _post(srv, alice, room, "before")
        seen = await ws.next("msg", ch=ch)
    position = {"epoch": seen["epoch"], "offset": seen["offset"]}
    for i in range(3):
        await _post(srv, alice, room, f"missed {i}")
    await wait_until(
        lambda: _last(srv, ch, position["offset"] + 3), what="the fan-out of the missed messages"
    )
    async with srv.ws(alice) as ws:
        ok = await ws.request("sub", ch=ch, since=position)
        assert ok["recovered"] is True and ok["offset"] == position["offset"] + 3
        missed = [await ws.next("msg", ch=ch) for _ in range(3)]
        assert [m["data"]["body"] for m in missed] == ["missed 0", "missed 1", "missed 2"]
        await _post(srv, alice, room, "live")
        assert (await ws.next("msg", ch=ch))["data"]["body"] == "live"
        assert not [f for f in await ws.drain() if f["op"] == "msg"]  # no duplicates
    async with srv.ws(alice) as ws:
        ok = await ws.request("sub", ch=ch, since={"epoch": "old-epoch", "offset": 1})
        assert ok["op"] == "ok" and ok["recovered"] is False
        assert not [f for f in await ws.drain() if f["op"] == "msg"]
    async with srv.ws(alice) as ws:  # up to date: recovered, nothing to replay
        ok = await ws.request("sub", ch=ch, since={"epoch": ok["epoch"], "offset": ok["offset"]})
        assert ok["recovered"] is True


async def _last(srv: Served, ch: str, offset: int) -> bool:
    return bool((await srv.runtime.realtime.broker.position(ch)).offset >= offset)


@pytest.mark.parametrize("srv", [{"realtime_history_size": 2}], indirect=True)
async def test_gap_older_than_history_is_not_recovered(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    hub = srv.runtime.realtime
    ch = f"user:{alice.id}"
    first = await hub.publish(ch, {"n": 1})
    pos = await hub.broker.position(ch)
    for n in range(2, 6):
        await hub.publish(ch, {"n": n})
    async with srv.ws(alice) as ws:
        ok = await ws.request("sub", ch=ch, since={"epoch": pos.epoch, "offset": first})
        # The sign-up's own points notice may land on this channel at any time,
        # so the expected offset is the channel's, not first + 4.
        last = (await hub.broker.position(ch)).offset
        assert ok["recovered"] is False and ok["offset"] == last >= first + 4


# -- presence and ephemeral --------------------------------------------------------


async def test_presence_and_ephemeral_typing(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    bob = await srv.arena.signup("bob")
    room = await _room(srv, alice, bob)
    ch = f"room:{room}"
    async with srv.ws(alice) as wa:
        start = await wa.request("sub", ch=ch, join_leave=True)
        async with srv.ws(bob) as wb, srv.ws(bob) as wb2:
            await wb.request("sub", ch=ch)  # not opted in: no join/leave frames for bob
            await wb2.request("sub", ch=ch)  # bob's second connection: no second join
            joins = [f for f in await wa.drain(0.3) if f["op"] == "join"]
            # coalesced: alice's own join and bob's may share one frame
            assert all(set(j) == {"op", "ch", "users"} and j["ch"] == ch for j in joins)
            users = [u for j in joins for u in j["users"]]
            assert {"user": bob.id, "name": "bob"} in users
            assert sum(u["user"] == bob.id for u in users) == 1, joins
            pres = await wa.request("presence", ch=ch)
            assert pres["op"] == "presence" and pres["ch"] == ch
            assert {m["user"] for m in pres["members"]} == {alice.id, bob.id}
            assert {m["name"] for m in pres["members"]} == {"alice", "bob"}
            ok = await wb.request("pub", ch=ch, data={"typing": True}, ephemeral=True)
            assert ok == {"op": "ok", "ref": ok["ref"]}  # no offset
            typing = await wa.next("msg", ch=ch)
            assert typing == {"op": "msg", "ch": ch, "data": {"typing": True}, "ephemeral": True}
            assert not [f for f in await wb.drain(0.3) if f["op"] in ("join", "leave")]
            await wb2.conn.close()  # one of bob's two connections: bob is still here
            assert not [f for f in await wa.drain(0.3) if f["op"] == "leave"]
        leave = await wa.next("leave", ch=ch)
        assert leave["users"] == [{"user": bob.id, "name": "bob"}]
        pres = await wa.request("presence", ch=ch)
        assert [m["user"] for m in pres["members"]] == [alice.id]
    # typing is not history
    async with srv.ws(alice) as wa:
        ok = await wa.request("sub", ch=ch, since={"epoch": start["epoch"], "offset": 0})
        assert ok["recovered"] is True and ok["offset"] == 0
        assert not [f for f in await wa.drain() if f["op"] == "msg"]
    async with srv.ws(await srv.arena.signup("carol")) as wc:
        assert (await wc.request("presence", ch=ch))["code"] == "forbidden"


# -- bad input -------------------------------------------------------------------------


async def test_malformed_unknown_and_oversized_frames(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    async with srv.ws(alice) as ws:
        err = await ws.request("launch", ch="x")
        assert err["op"] == "error" and err["code"] == "unknown_op"
        await ws.send({"ref": 9})
        assert (await ws.next("error"))["code"] == "bad_request"
        assert (await ws.request("sub", ch="no spaces allowed"))["code"] == "bad_request"
        assert (await ws.request("sub", ch=f"user:{alice.id}", since={"epoch": 1}))[
            "code"
        ] == "bad_request"
        assert (await ws.request("unsub", ch="room:1"))["code"] == "not_subscribed"
        assert (await ws.request("pub", ch=f"user:{alice.id}"))["code"] == "bad_request"
        assert (await ws.request("auth", token="again"))["code"] == "bad_request"
        assert (await ws.request("ping"))["op"] == "pong"  # still alive
        await ws.send("this is not json")
        assert await ws.close_code() == 4000
    for bad in ("[1, 2]", '"text"', "{" + " " * 20_000 + "}"):
        async with srv.ws(alice) as ws:
            await ws.send(bad)
            assert await ws.close_code() == 4000, bad
    async with srv.ws(alice) as ws:  # binary frames holding JSON are read too
        await ws.conn.send(b'{"op":"ping","ref":5}')
        assert await ws.next("pong") == {"op": "pong", "ref": 5}
    # the hub survived all of it
    async with srv.ws(alice) as ws:
        assert (await ws.request("sub", ch=f"user:{alice.id}"))["op"] == "ok"


# -- limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "srv",
    [
        {
            "realtime_max_channels": 2,
            "realtime_publish_rate": 1.0,
            "realtime_publish_burst": 3,
            "realtime_max_conns_per_user": 2,
        }
    ],
    indirect=True,
)
async def test_channel_publish_and_connection_limits(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    bob = await srv.arena.signup("bob")
    r1 = await _room(srv, alice)
    r2 = await _room(srv, alice)
    async with srv.ws(alice) as ws:
        assert (await ws.request("sub", ch=f"room:{r1}"))["op"] == "ok"
        assert (await ws.request("sub", ch=f"room:{r2}"))["op"] == "ok"
        assert (await ws.request("sub", ch=f"user:{alice.id}"))["code"] == "limit"
        assert (await ws.request("unsub", ch=f"room:{r2}"))["op"] == "ok"
        assert (await ws.request("sub", ch=f"user:{alice.id}"))["op"] == "ok"
        answers = [
            await ws.request("pub", ch=f"room:{r1}", data={"t": i}, ephemeral=True)
            for i in range(5)
        ]
        assert [a["op"] for a in answers[:3]] == ["ok"] * 3
        assert answers[3]["code"] == "rate_limited"
        async with srv.ws(alice) as second:
            async with srv.ws() as third:
                await third.send({"op": "auth", "token": alice.access})
                assert await third.close_code() == 4008
            assert (await second.request("ping"))["op"] == "pong"
        async with srv.ws(bob) as other_user:  # the limit is per user
            assert (await other_user.request("ping"))["op"] == "pong"
    async with srv.ws(alice), srv.ws(alice):  # closed connections were released
        pass


# -- backpressure ---------------------------------------------------------------------


@pytest.mark.parametrize("srv", [{"realtime_send_queue": 16}], indirect=True)
async def test_slow_consumer_is_closed_and_fast_one_gets_everything(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    bob = await srv.arena.signup("bob")
    room = await _room(srv, alice, bob)
    ch = f"room:{room}"
    hub = srv.runtime.realtime
    payload = {"blob": "x" * 16_000}
    before = await _metrics(srv)
    # the slow client stops reading after one buffered frame (backpressure to TCP)
    async with srv.ws(alice) as fast, srv.ws(bob, max_queue=1) as slow:
        await fast.request("sub", ch=ch, join_leave=True)
        await slow.request("sub", ch=ch)
        await fast.next("join", ch=ch)
        slow_conn = next(c for c in hub.connections if c.user == bob.id)
        sent = 0
        received: list[int] = []

        async def reader() -> None:
            while len(received) < sent or slow_conn.close_code is None:
                f = await fast.next("msg", ch=ch, timeout_s=10)
                received.append(f["data"]["n"])

        task = asyncio.create_task(reader())
        async with asyncio.timeout(30):
            while slow_conn.close_code is None:
                await hub.publish(ch, {**payload, "n": sent})
                sent += 1
                if sent % 4 == 0:
                    await asyncio.sleep(0.001)  # let the writers run
        assert slow_conn.close_code == 4009 and sent > 16  # it took real TCP backpressure
        await asyncio.wait_for(task, 30)
        assert received == list(range(sent)), "the fast client missed or reordered frames"
        assert await slow.close_code(timeout_s=15) == 4009
    after = await _metrics(srv)
    assert _delta(after, before, "tenfold_realtime_slow_consumers_total") == 1
    assert _delta(after, before, "tenfold_realtime_frames_dropped_total") >= 16


# -- metrics ---------------------------------------------------------------------------


async def _metrics(srv: Served) -> dict[str, float]:
    """GET /metrics from the served arena: {"name{label=value,...}": value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{srv.port}/metrics")
    assert r.status_code == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def _delta(after: dict[str, float], before: dict[str, float], name: str, labels: str = "") -> float:
    key = f"{name}{{{labels}}}"
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.mark.parametrize(
    "srv",
    [
        {
            "realtime_max_channels": 1,
            "realtime_publish_burst": 1,
            "realtime_publish_rate": 0.001,
            "realtime_max_conns_per_user": 2,
        }
    ],
    indirect=True,
)
async def test_hub_metrics_on_the_metrics_endpoint(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    room = await _room(srv, alice)
    ch = f"room:{room}"
    hub = srv.runtime.realtime
    before = await _metrics(srv)
    async with srv.ws(alice) as one, srv.ws(alice) as two:
        assert (await one.request("sub", ch=ch))["op"] == "ok"
        assert (await two.request("sub", ch=ch))["op"] == "ok"
        during = await _metrics(srv)
        assert _delta(during, before, "tenfold_realtime_connections") == 2
        assert _delta(during, before, "tenfold_realtime_subscriptions") == 2
        for n in range(3):
            await hub.publish(ch, {"n": n})
        for ws in (one, two):
            assert [(await ws.next("msg", ch=ch))["data"]["n"] for _ in range(3)] == [0, 1, 2]
        # one refusal of each kind
        assert (await one.request("sub", ch=f"user:{alice.id}"))["code"] == "limit"
        assert (await one.request("pub", ch=ch, data={}, ephemeral=True))["op"] == "ok"
        assert (await one.request("pub", ch=ch, data={}, ephemeral=True))["code"] == "rate_limited"
        async with srv.ws() as third:
            await third.send({"op": "auth", "token": alice.access})
            assert await third.close_code() == 4008
        after = await _metrics(srv)
    assert _delta(after, before, "tenfold_realtime_messages_delivered_total") == 3 * 2 + 2
    # 3 stored + 1 ephemeral publish, each observed once on this node
    assert _delta(after, before, "tenfold_realtime_publish_to_send_seconds_count") == 4
    assert _delta(after, before, "tenfold_realtime_publish_to_send_seconds_bucket", "le=+Inf") == 4
    for kind in ("channels", "publish_rate", "connections"):
        assert _delta(after, before, "tenfold_realtime_refusals_total", f"kind={kind}") == 1, kind
    await wait_until(lambda: _closed(srv, before), what="the gauges to drop after the close")


async def _closed(srv: Served, before: dict[str, float]) -> bool:
    now = await _metrics(srv)
    return (
        _delta(now, before, "tenfold_realtime_connections") == 0
        and _delta(now, before, "tenfold_realtime_subscriptions") == 0
    )


# -- shutdown ----------------------------------------------------------------------------


async def test_stop_closes_clients_with_1001(tmp_path: Path) -> None:
    async with served_arena(sqlite_settings(tmp_path / "rt")) as srv:
        alice = await srv.arena.signup("alice")
        async with srv.ws(alice) as ws:
            await srv.runtime.realtime.stop()
            assert await ws.close_code() == 1001
