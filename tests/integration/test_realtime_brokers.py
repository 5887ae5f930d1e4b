"""One behavioural suite for every realtime broker (memory, NATS): the contract of
`tenfold.realtime.base.Broker`.

Fan-out, history (offsets, positions, replay, gaps, epochs), presence and the
per-user connection count, each against every broker. The in-process broker
runs on a fake clock; NATS expires entries on the server's clock, so its TTL
checks wait with wide margins and poll for expiry. What only a multi-node
broker can do (another node's frames, presence and connections) runs on the
brokers that span nodes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tenfold.realtime.base import Broker, broker_from_url
from tenfold.realtime.memory import MemoryBroker
from tests.integration.support import wait_until

HISTORY = 3
TTL_S = 3.0  # presence and connection entries; NATS sets it on its (shared) stream
OPTIONS: dict[str, Any] = {"history_size": HISTORY, "history_ttl_s": 60.0, "presence_ttl_s": TTL_S}


class Node:
    """One started broker and the frames it delivered."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.frames: list[tuple[str, int | None, str, float]] = []
        self._arrived = asyncio.Event()

    def deliver(self, channel: str, offset: int | None, text: str, at: float) -> None:
        self.frames.append((channel, offset, text, at))
        self._arrived.set()

    def on(self, channel: str) -> list[tuple[int | None, str]]:
        return [(offset, text) for ch, offset, text, _ in self.frames if ch == channel]

    async def wait_for(self, channel: str, count: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.on(channel)) < count:
                self._arrived.clear()
                await self._arrived.wait()


class Brokers:
    """Makes started nodes of one broker kind; `advance` moves its clock."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.now = [1000.0]
        self.nodes: list[Node] = []
        self.spans_nodes = kind != "memory"

    async def node(self) -> Node:
        if self.kind == "memory":
            broker: Broker = MemoryBroker(clock=lambda: self.now[0], **OPTIONS)
        else:
            broker = broker_from_url(self.url, **OPTIONS)
        node = Node(broker)
        await broker.start(node.deliver)
        self.nodes.append(node)
        return node

    async def advance(self, seconds: float) -> None:
        """Let `seconds` pass on the broker's clock."""
        if self.kind == "memory":
            self.now[0] += seconds
        else:
            await asyncio.sleep(seconds)

    async def eventually(self, check: Any, what: str) -> None:
        """Assert `check()` now (fake clock) or within a few TTLs (server clock)."""
        if self.kind == "memory":
            assert await check(), what
        else:
            await wait_until(check, timeout_s=5 * TTL_S, what=what)


@pytest.fixture(params=["memory", "nats"])
async def brokers(request: pytest.FixtureRequest) -> AsyncIterator[Brokers]:
    url = request.getfixturevalue("nats_url") if request.param == "nats" else "memory://"
    harness = Brokers(request.param, url)
    yield harness
    for node in harness.nodes:
        await node.broker.close()


def channel() -> str:
    return f"room:{uuid.uuid4().hex[:12]}"  # ':' is escaped into a NATS subject token


def decode(text: str) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(text)
    return frame


# -- fan-out -------------------------------------------------------------------------


async def test_publish_reaches_subscribed_channels_only(brokers: Brokers) -> None:
    node = await brokers.node()
    mine, other = channel(), channel()
    await node.broker.subscribe(mine)
    offset = await node.broker.publish(mine, b'{"n":1}')
    await node.broker.publish(other, b'{"n":2}')
    await node.wait_for(mine, 1)
    [(got_offset, text)] = node.on(mine)
    frame = decode(text)
    assert got_offset == offset and isinstance(offset, int) and offset > 0
    epoch = (await node.broker.position(mine)).epoch
    assert frame == {"op": "msg", "ch": mine, "epoch": epoch, "offset": offset, "data": {"n": 1}}
    await node.broker.publish(mine, b'{"n":3}')  # a later frame on mine flushes the pipe
    await node.wait_for(mine, 2)
    assert node.on(other) == []


async def test_unsubscribe_stops_delivery(brokers: Brokers) -> None:
    node = await brokers.node()
    ch, marker = channel(), channel()
    await node.broker.subscribe(ch)
    await node.broker.subscribe(ch)  # idempotent
    await node.broker.publish(ch, b"1")
    await node.wait_for(ch, 1)
    await node.broker.unsubscribe(ch)
    await node.broker.publish(ch, b"2")
    await node.broker.subscribe(marker)  # ordered after the publish on one connection
    await node.broker.publish(marker, b"0")
    await node.wait_for(marker, 1)
    assert len(node.on(ch)) == 1


async def test_ephemeral_publishes_and_frames_are_fanned_out_not_stored(brokers: Brokers) -> None:
    node = await brokers.node()
    ch = channel()
    await node.broker.subscribe(ch)
    stored = await node.broker.publish(ch, b'{"n":1}')
    assert await node.broker.publish(ch, b'{"typing":true}', ephemeral=True) is None
    join = orjson.dumps({"op": "join", "ch": ch, "users": []}).decode()
    await node.broker.publish_frame(ch, join)
    await node.wait_for(ch, 3)
    offsets = [offset for offset, _ in node.on(ch)]
    assert offsets == [stored, None, None]
    assert decode(node.on(ch)[1][1]) == {
        "op": "msg",
        "ch": ch,
        "data": {"typing": True},
        "ephemeral": True,
    }
    assert node.on(ch)[2][1] == join
    position = await node.broker.position(ch)
    assert position.offset == stored  # neither was stored
    assert await node.broker.since(ch, position.epoch, 0) == [(stored, node.on(ch)[0][1])]


# -- history -------------------------------------------------------------------------


async def test_offsets_grow_per_channel_and_position_is_the_last(brokers: Brokers) -> None:
    node = await brokers.node()
    ch, empty = channel(), channel()
    offsets = [await node.broker.publish(ch, b"%d" % i) for i in range(3)]
    assert all(isinstance(o, int) for o in offsets)
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
    position = await node.broker.position(ch)
    assert position.offset == offsets[-1] and position.epoch
    empty_position = await node.broker.position(empty)
    assert empty_position.offset == 0 and empty_position.epoch == position.epoch


async def test_since_replays_what_followed_a_position_in_order(brokers: Brokers) -> None:
    node = await brokers.node()
    ch = channel()
    offsets = [await node.broker.publish(ch, b'{"i":%d}' % i) for i in range(3)]
    epoch = (await node.broker.position(ch)).epoch
    replay = await node.broker.since(ch, epoch, offsets[0])
    assert replay is not None
    assert [offset for offset, _ in replay] == offsets[1:]
    assert [decode(text)["data"] for _, text in replay] == [{"i": 1}, {"i": 2}]
    assert all(decode(text)["epoch"] == epoch for _, text in replay)
    assert await node.broker.since(ch, epoch, offsets[-1]) == []  # up to date


async def test_since_is_none_when_it_cannot_give_every_frame(brokers: Brokers) -> None:
    node = await brokers.node()
    ch = channel()
    offsets = [await node.broker.publish(ch, b"%d" % i) for i in range(HISTORY + 2)]
    epoch = (await node.broker.position(ch)).epoch
    assert await node.broker.since(ch, epoch, offsets[0]) is None  # its successor expired
    kept = await node.broker.since(ch, epoch, offsets[-HISTORY - 1])
    assert kept is not None and [o for o, _ in kept] == offsets[-HISTORY:]
    assert await node.broker.since(ch, "another-epoch", offsets[-2]) is None
    assert await node.broker.since(ch, epoch, offsets[-1] + 1000) is None  # from the future


# -- presence --------------------------------------------------------------------------


async def test_presence_lists_one_entry_per_user(brokers: Brokers) -> None:
    node = await brokers.node()
    ch = channel()
    broker = node.broker
    await broker.presence_add(ch, "c1", "u1", "Ann")
    await broker.presence_add(ch, "c2", "u1", "Ann")  # a second tab
    await broker.presence_add(ch, "c3", "u2", "Bob")
    assert await broker.presence_list(ch) == [
        {"user": "u1", "name": "Ann"},
        {"user": "u2", "name": "Bob"},
    ]
    assert await broker.presence_users(ch, ["u1", "u3"]) == {"u1"}
    await broker.presence_remove(ch, "c1")
    assert await broker.presence_users(ch, ["u1", "u2"]) == {"u1", "u2"}  # c2 remains
    await broker.presence_remove(ch, "c2")
    assert await broker.presence_list(ch) == [{"user": "u2", "name": "Bob"}]
    assert await broker.presence_list(channel()) == []


async def test_presence_expires_unless_refreshed(brokers: Brokers) -> None:
    node = await brokers.node()
    ch = channel()
    broker = node.broker
    await broker.presence_add(ch, "kept", "u1", "Ann")
    await broker.presence_add(ch, "dropped", "u2", "Bob")
    await brokers.advance(TTL_S / 3)
    await broker.refresh([(ch, "kept", "u1", "Ann")], [])
    await brokers.advance(TTL_S * 2 / 3 + 0.1)  # past the first TTL, within the renewed one

    async def only_ann() -> bool:
        return await broker.presence_users(ch, ["u1", "u2"]) == {"u1"}

    await brokers.eventually(only_ann, "bob's entry to expire while ann's is renewed")
    assert await broker.presence_users(ch, ["u1"]) == {"u1"}  # renewed at TTL/3: still there


# -- connections per user --------------------------------------------------------------


async def test_connections_per_user_stop_at_the_limit(brokers: Brokers) -> None:
    broker = (await brokers.node()).broker
    user, other = f"u{uuid.uuid4().hex[:8]}", f"v{uuid.uuid4().hex[:8]}"
    assert await broker.conn_acquire(user, "c1", 2)
    assert await broker.conn_acquire(user, "c2", 2)
    assert not await broker.conn_acquire(user, "c3", 2)
    assert await broker.conn_acquire(other, "d1", 2)  # per user
    await broker.conn_release(user, "c1")
    assert await broker.conn_acquire(user, "c3", 2)
    assert not await broker.conn_acquire(user, "c4", 2)


async def test_a_burst_of_connections_admits_exactly_the_limit(brokers: Brokers) -> None:
    broker = (await brokers.node()).broker
    user = f"u{uuid.uuid4().hex[:8]}"
    admitted = await asyncio.gather(*(broker.conn_acquire(user, f"c{i}", 5) for i in range(40)))
    assert sum(admitted) == 5


async def test_connection_entries_expire_unless_refreshed(brokers: Brokers) -> None:
    broker = (await brokers.node()).broker
    kept, dropped = f"k{uuid.uuid4().hex[:8]}", f"d{uuid.uuid4().hex[:8]}"
    assert await broker.conn_acquire(kept, "k1", 1)
    assert await broker.conn_acquire(dropped, "d1", 1)
    await brokers.advance(TTL_S / 3)
    await broker.refresh([], [(kept, "k1")])
    await brokers.advance(TTL_S * 2 / 3 + 0.1)

    async def dropped_is_free() -> bool:
        return bool(await broker.conn_acquire(dropped, "d2", 1))

    await brokers.eventually(dropped_is_free, "the unrenewed connection to expire")
    assert not await broker.conn_acquire(kept, "k2", 1)  # renewed: still counted


# -- across nodes -----------------------------------------------------------------------


async def test_other_nodes_see_frames_presence_and_connections(brokers: Brokers) -> None:
    if not brokers.spans_nodes:
        pytest.skip(f"the {brokers.kind} broker is one node by design")
    a, b = await brokers.node(), await brokers.node()
    ch = channel()
    await b.broker.subscribe(ch)
    offset = await a.broker.publish(ch, b'{"from":"a"}')
    await a.broker.publish(ch, b'{"typing":1}', ephemeral=True)
    await b.wait_for(ch, 2)
    assert [o for o, _ in b.on(ch)] == [offset, None]
    assert (await b.broker.position(ch)).offset == offset
    await a.broker.presence_add(ch, "ca", "ua", "Ann")
    assert await b.broker.presence_list(ch) == [{"user": "ua", "name": "Ann"}]
    user = f"u{uuid.uuid4().hex[:8]}"
    assert await a.broker.conn_acquire(user, "c1", 2)
    assert await b.broker.conn_acquire(user, "c2", 2)
    assert not await a.broker.conn_acquire(user, "c3", 2)  # the limit is cluster-wide
    await b.broker.conn_release(user, "c2")
    assert await a.broker.conn_acquire(user, "c3", 2)
