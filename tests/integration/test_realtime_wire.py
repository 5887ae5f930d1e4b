"""tenfold's uvicorn WebSocket protocol (realtime/wire.py): what the ASGI path does
not exercise: keepalive, fragments, pipelined frames, other WebSocket routes,
bad handshakes, shutdown, frame encoding."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from tenfold.realtime.wire import encode_text
from tests.integration.arena_support import sqlite_settings
from tests.integration.realtime_support import WS, Served, served_arena
from tests.integration.support import wait_until


async def _echo(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text("echo:" + text)


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Served]:
    routes = [WebSocketRoute("/echo", _echo)]
    async with served_arena(sqlite_settings(tmp_path / "rt"), routes=routes) as s:
        yield s


class RawClient:
    """A WebSocket client on a bare socket: it answers nothing unless told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, path: str = "/ws", key: bytes | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = key if key is not None else base64.b64encode(os.urandom(16))
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n".encode()
            + b"Sec-WebSocket-Key: "
            + key
            + b"\r\n\r\n"
        )
        return cls(reader, writer)

    async def status(self) -> int:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        return int(head.split(b" ", 2)[1])

    def send(self, opcode: Opcode, data: bytes, fin: bool = True) -> None:
        self.writer.write(Frame(opcode, data, fin).serialize(mask=True, extensions=[]))

    async def frame(self) -> Frame:
        """The next frame from the server (unmasked)."""
        head = await asyncio.wait_for(self.reader.readexactly(2), 5)
        n = head[1] & 0x7F
        ext = b""
        if n == 126:
            ext = await self.reader.readexactly(2)
        elif n == 127:
            ext = await self.reader.readexactly(8)
        size = int.from_bytes(ext, "big") if ext else n
        body = await self.reader.readexactly(size)
        return _parse(head + ext + body)

    def close(self) -> None:
        self.writer.close()


def _parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
        while True:
            parser.send(None)
    except StopIteration as done:
        frame: Frame = done.value
        return frame


def test_encode_text_lengths_and_shared_frames() -> None:
    for size in (0, 1, 125, 126, 65535, 65536, 70_000):
        text = "é" * (size // 2) + "x" * (size % 2)
        frame = _parse(encode_text(text))
        assert frame.opcode is Opcode.TEXT and frame.fin
        assert bytes(frame.data).decode() == text
    fanned = "x" * 300
    assert encode_text(fanned) is encode_text(fanned)  # encoded once per fan-out
    assert encode_text("y" * 300) is not encode_text("y" * 300)  # equal but different objects


async def test_other_websocket_routes_go_to_the_app(srv: Served) -> None:
    async with connect(f"ws://127.0.0.1:{srv.port}/echo") as conn:
        await conn.send("hi")
        assert await conn.recv() == "echo:hi"
    assert not srv.runtime.realtime.connections


async def test_bad_handshake_is_refused_and_the_hub_carries_on(srv: Served) -> None:
    raw = await RawClient.open(srv.port, key=b"not base64 of 16 bytes")
    assert await raw.status() == 400
    raw.close()
    alice = await srv.arena.signup("alice")
    async with srv.ws(alice) as ws:
        assert (await ws.request("ping"))["op"] == "pong"


async def test_fragments_and_pipelined_frames_are_answered_in_order(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    raw = await RawClient.open(srv.port)
    assert await raw.status() == 101
    auth = orjson.dumps({"op": "auth", "token": alice.access, "ref": 0})
    raw.send(Opcode.TEXT, auth[:10], fin=False)
    raw.send(Opcode.PING, b"mid-message")  # control frames may interleave
    raw.send(Opcode.CONT, auth[10:20], fin=False)
    raw.send(Opcode.CONT, auth[20:])
    for ref in range(1, 101):  # far more than the read-ahead bound
        raw.send(Opcode.TEXT, orjson.dumps({"op": "ping", "ref": ref}))
    pong = await raw.frame()
    assert pong.opcode is Opcode.PONG and bytes(pong.data) == b"mid-message"
    ok = orjson.loads((await raw.frame()).data)
    assert ok["op"] == "ok" and ok["ref"] == 0 and ok["user"] == alice.id
    refs = [orjson.loads((await raw.frame()).data)["ref"] for _ in range(100)]
    assert refs == list(range(1, 101))
    raw.close()


async def test_oversized_frame_is_closed(srv: Served) -> None:
    alice = await srv.arena.signup("alice")
    async with srv.ws(alice) as ws:
        await ws.send("x" * 20_000)  # over arena's 16 KiB frame bound
        assert await ws.close_code() == 4000
    await wait_until(lambda: not srv.runtime.realtime.connections)


async def test_silent_clients_are_dropped_and_live_ones_kept(srv: Served) -> None:
    hub = srv.runtime.realtime
    hub.limits = replace(hub.limits, ping_interval_s=0.2)
    await hub.stop()  # restart the ping loop with the short interval
    await hub.start()
    alice = await srv.arena.signup("alice")
    raw = await RawClient.open(srv.port)
    assert await raw.status() == 101
    raw.send(Opcode.TEXT, orjson.dumps({"op": "auth", "token": alice.access}))
    assert orjson.loads((await raw.frame()).data)["op"] == "ok"
    async with srv.ws(alice) as live:  # the websockets client answers pings itself
        await wait_until(lambda: len(hub.connections) == 2)
        ping = await raw.frame()
        assert ping.opcode is Opcode.PING  # and the raw client never answers
        await wait_until(lambda: len(hub.connections) == 1, timeout_s=3)
        assert (await live.request("ping"))["op"] == "pong"  # several intervals later
        [kept] = hub.connections
        assert kept.user == alice.id
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        while True:  # what is left: the close frame (1011), then nothing
            await raw.frame()
    raw.close()


async def test_server_shutdown_closes_hub_clients_with_1012(tmp_path: Path) -> None:
    async with served_arena(sqlite_settings(tmp_path / "rt")) as srv:
        alice = await srv.arena.signup("alice")
        conn = await connect(srv.url())
        ws = WS(conn)
        assert (await ws.request("auth", token=alice.access))["op"] == "ok"
        closing = asyncio.create_task(ws.close_code())
    # leaving served_arena stops uvicorn: connections are shut down first
    assert await closing in (1012, 1001)
    assert not srv.runtime.realtime.connections
