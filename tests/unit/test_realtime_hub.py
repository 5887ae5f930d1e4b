"""The hub in-process (memory broker, ASGI connections without sockets): presence events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from tenfold.realtime import Hub, HubLimits
from tenfold.realtime.memory import MemoryBroker


@dataclass
class _Principal:
    subject: str
    claims: dict[str, Any] = field(default_factory=dict)


class _Client:
    """One ASGI websocket connection driven in-process: frames in, frames out."""

    def __init__(self, hub: Hub, user: str) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.frames: list[dict[str, Any]] = []
        self.got = asyncio.Event()
        self.closed: int | None = None
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.inbox.put_nowait(
            {"type": "websocket.receive", "text": f'{{"op":"auth","token":"{user}"}}'}
        )
        scope = {"type": "websocket", "query_string": b""}
        self.task = asyncio.create_task(hub.serve(scope, self.inbox.get, self.send))

    async def send(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "websocket.send":
            self.frames.append(orjson.loads(msg["text"]))
            self.got.set()
        elif msg["type"] == "websocket.close":
            self.closed = msg.get("code", 1000)

    def put(self, **frame: Any) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": orjson.dumps(frame).decode()})

    async def answer(self, ref: int, timeout_s: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                for f in self.frames:
                    if f.get("ref") == ref:
                        return f
                self.got.clear()
                await self.got.wait()

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["op"] == op]

    async def close(self) -> None:
        self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    h = Hub(
        MemoryBroker(),
        authenticate=lambda token: _Principal(token, {"name": f"n{token}"}),
        limits=HubLimits(max_conns_per_user=100_000, presence_window_s=0.05),
    )

    async def allow(principal: Any, channel: str, action: str) -> bool:
        return True

    h.authorize = allow
    await h.start()
    yield h
    await h.stop()


async def _subscribed(hub: Hub, user: str, ch: str, **opts: Any) -> _Client:
    c = _Client(hub, user)
    c.put(op="sub", ch=ch, ref=1, **opts)
    assert (await c.answer(1))["op"] == "ok"
    return c


async def _settle(hub: Hub) -> None:
    """Past the coalescing window, with the flush done."""
    await asyncio.sleep(hub.limits.presence_window_s * 3)
    await hub.presence.flush()


async def test_join_leave_only_for_subscribers_that_opt_in(hub: Hub) -> None:
    watcher = await _subscribed(hub, "w", "room:1", join_leave=True)
    plain = await _subscribed(hub, "p", "room:1")
    other = await _subscribed(hub, "o", "room:1")
    await _settle(hub)
    await other.close()
    await _settle(hub)
    assert not plain.ops("join") and not plain.ops("leave")
    joined = {u["user"] for f in watcher.ops("join") for u in f["users"]}
    assert {"p", "o"} <= joined
    assert [u["user"] for f in watcher.ops("leave") for u in f["users"]] == ["o"]
    assert watcher.ops("join")[0]["users"][0].keys() == {"user", "name"}
    # a publish still reaches everyone
    await hub.publish("room:1", {"x": 1})
    await asyncio.sleep(0.01)
    assert plain.ops("msg") and watcher.ops("msg")
    bad = _Client(hub, "b")
    bad.put(op="sub", ch="room:2", ref=1, join_leave="yes")
    assert (await bad.answer(1))["code"] == "bad_request"


async def test_second_connection_of_a_user_is_not_a_second_join(hub: Hub) -> None:
    watcher = await _subscribed(hub, "w", "room:1", join_leave=True)
    await _settle(hub)
    first = await _subscribed(hub, "u", "room:1")
    await _settle(hub)
    second = await _subscribed(hub, "u", "room:1")
    await _settle(hub)
    assert sum(u["user"] == "u" for f in watcher.ops("join") for u in f["users"]) == 1
    await second.close()
    await _settle(hub)
    assert not watcher.ops("leave")  # "u" is still here on its first connection
    assert [m["user"] for m in await hub.broker.presence_list("room:1")] == ["u", "w"]
    await first.close()
    await _settle(hub)
    assert [u["user"] for f in watcher.ops("leave") for u in f["users"]] == ["u"]


async def test_a_burst_of_joins_is_coalesced(hub: Hub) -> None:
    watcher = await _subscribed(hub, "w", "room:1", join_leave=True)
    await _settle(hub)
    assert watcher.ops("join") == [
        {"op": "join", "ch": "room:1", "users": [{"user": "w", "name": "nw"}]}
    ]
    watcher.frames.clear()
    n = 200
    clients = await asyncio.gather(*(_subscribed(hub, f"u{i}", "room:1") for i in range(n)))
    await _settle(hub)
    joins = watcher.ops("join")
    assert {u["user"] for f in joins for u in f["users"]} == {f"u{i}" for i in range(n)}
    assert len(joins) <= 10, f"{len(joins)} join frames for {n} joins"
    # a join and a leave inside one window cancel out
    before = len(watcher.frames)
    quick = await _subscribed(hub, "q", "room:1")
    await quick.close()
    await _settle(hub)
    assert not [f for f in watcher.frames[before:] if f["op"] in ("join", "leave")]
    for c in clients:
        await c.close()


async def test_two_thousand_subscribers_set_up_in_bounded_time(hub: Hub) -> None:
    n = 2000
    watcher = await _subscribed(hub, "w", "room:big", join_leave=True)
    await _settle(hub)
    watcher.frames.clear()
    started = time.perf_counter()
    clients = await asyncio.gather(
        *(_subscribed(hub, f"u{i % 40}", "room:big", join_leave=i % 2 == 0) for i in range(n))
    )
    took = time.perf_counter() - started
    await _settle(hub)
    # O(n) setup: with a join frame per subscribe to every subscriber (O(n²), 2M frames)
    # this took minutes; a generous bound for a busy 2-core machine
    assert took < 20, f"{n} subscribers took {took:.1f} s"
    frames = sum(len(c.frames) for c in clients)
    assert frames < 10 * n, f"{frames} frames delivered while {n} clients subscribed"
    assert {u["user"] for f in watcher.ops("join") for u in f["users"]} == {
        f"u{i}" for i in range(40)
    }
    assert len(hub.channels["room:big"]) == n + 1
    await asyncio.gather(*(c.close() for c in clients))
    await _settle(hub)
    assert {u["user"] for f in watcher.ops("leave") for u in f["users"]} == {
        f"u{i}" for i in range(40)
    }


async def test_publish_json_sends_the_same_frame_as_publish(hub: Hub) -> None:
    client = await _subscribed(hub, "u", "room:7")
    data = {"id": "12", "body": 'héllo "quoted"', "n": [1, 2.5, None]}
    await hub.publish("room:7", data)
    await hub.publish_json("room:7", orjson.dumps(data))
    await asyncio.sleep(0.01)
    first, second = client.ops("msg")
    assert first["data"] == second["data"] == data
    assert second["offset"] == first["offset"] + 1  # the same history, in order
    with pytest.raises(Exception, match="channel"):
        await hub.publish_json("no channel here", b"{}")
