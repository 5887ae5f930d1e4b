"""The realtime wire protocol and the in-process broker, without sockets."""

from __future__ import annotations

import orjson
import pytest

from tenfold.realtime import protocol as p
from tenfold.realtime.memory import MemoryBroker


def test_parse_valid_frames() -> None:
    r = p.parse('{"op":"sub","ch":"room:42","ref":2,"since":{"epoch":"e","offset":17}}', 1024)
    assert (r.op, r.ch, r.ref, r.since) == ("sub", "room:42", 2, ("e", 17))
    r = p.parse(b'{"op":"pub","ch":"room:1","data":{"a":[1,2]},"ephemeral":true}', 1024)
    assert r.ephemeral and orjson.loads(r.data) == {"a": [1, 2]} and r.ref is None
    assert p.parse('{"op":"ping"}', 64).op == "ping"


@pytest.mark.parametrize("raw", ["nope", "[1]", '"s"', "1", "{" + " " * 100 + "}", b"\xff"])
def test_malformed(raw: str | bytes) -> None:
    with pytest.raises(p.Malformed):
        p.parse(raw, 64)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ('{"op":"fly","ref":1}', "unknown_op"),
        ('{"ref":1}', "bad_request"),
        ('{"op":"sub","ref":1}', "bad_request"),
        ('{"op":"sub","ch":"a b","ref":1}', "bad_request"),
        ('{"op":"sub","ch":"' + "x" * 200 + '"}', "bad_request"),
        ('{"op":"sub","ch":"a","since":{"epoch":"e","offset":-1}}', "bad_request"),
        ('{"op":"sub","ch":"a","since":{"epoch":"e","offset":true}}', "bad_request"),
        ('{"op":"pub","ch":"a"}', "bad_request"),
        ('{"op":"pub","ch":"a","data":1,"ephemeral":"yes"}', "bad_request"),
        ('{"op":"auth"}', "bad_request"),
        ('{"op":"ping","ref":"1"}', "bad_request"),
    ],
)
def test_bad_frames(raw: str, code: str) -> None:
    with pytest.raises(p.BadFrame) as info:
        p.parse(raw, 4096)
    assert info.value.code == code


def test_frames_are_json() -> None:
    stored = orjson.loads(p.msg_frame("room:1", b'{"x":1}', "ep", 7))
    assert stored == {"op": "msg", "ch": "room:1", "epoch": "ep", "offset": 7, "data": {"x": 1}}
    eph = orjson.loads(p.msg_frame("room:1", b"[1]"))
    assert eph == {"op": "msg", "ch": "room:1", "data": [1], "ephemeral": True}
    assert orjson.loads(p.error_frame("forbidden", "no", 3))["ref"] == 3


def test_escape_channel_is_one_token_and_injective() -> None:
    names = ["room:1", "room.1", "room~3a1", "a@b", "user:42"]
    escaped = [p.escape_channel(n) for n in names]
    assert len(set(escaped)) == len(names)
    assert all("." not in e and ":" not in e and "*" not in e and ">" not in e for e in escaped)


class _Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_memory_broker_history_presence_and_conns() -> None:
    clock = _Clock()
    got: list[tuple[str, int | None, str]] = []
    b = MemoryBroker(clock=clock, history_size=3, history_ttl_s=60, presence_ttl_s=30)
    await b.start(lambda ch, off, text, at: got.append((ch, off, text)))
    assert await b.publish("c", b"1") == 1  # not subscribed: stored, not delivered
    await b.subscribe("c")
    assert await b.publish("c", b"2") == 2 and got[-1][1] == 2
    assert await b.publish("c", b"3", ephemeral=True) is None and got[-1][1] is None
    pos = await b.position("c")
    assert pos.offset == 2
    assert [o for o, _ in await b.since("c", pos.epoch, 0) or []] == [1, 2]
    assert await b.since("c", "other", 0) is None
    assert await b.since("c", pos.epoch, 9) is None
    for _ in range(3):
        await b.publish("c", b"0")
    assert await b.since("c", pos.epoch, 0) is None  # 1 fell out of the ring
    assert [o for o, _ in await b.since("c", pos.epoch, 2) or []] == [3, 4, 5]
    clock.now += 61
    assert await b.since("c", pos.epoch, 2) is None  # older than the TTL
    assert await b.since("c", pos.epoch, 5) == []

    await b.presence_add("c", "k1", "u1", "one")
    await b.presence_add("c", "k2", "u1", "one")
    await b.presence_add("c", "k3", "u2", "two")
    assert [m["user"] for m in await b.presence_list("c")] == ["u1", "u2"]
    await b.presence_remove("c", "k3")
    assert [m["user"] for m in await b.presence_list("c")] == ["u1"]
    clock.now += 31  # no heartbeat: entries expire
    assert await b.presence_list("c") == []

    assert await b.conn_acquire("u", "a", 2) and await b.conn_acquire("u", "b", 2)
    assert not await b.conn_acquire("u", "c", 2)
    await b.conn_release("u", "a")
    assert await b.conn_acquire("u", "c", 2)
    clock.now += 31
    assert await b.conn_acquire("u", "d", 2)  # the others expired without a heartbeat
