"""Helpers for the realtime tests: arena served by a real uvicorn, a JSON WebSocket client.

async with served_arena(settings) as srv:          # migrated, listening on a free port
    alice = await srv.arena.signup("alice")
    async with srv.ws(alice) as ws:
        await ws.request("sub", ch="user:" + alice.id)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from starlette.routing import BaseRoute
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from apps.arena.app import create_app
from tenfold.config import Settings
from tests.integration.arena_support import FAST, Arena, User, client_for, migrate
from tests.integration.support import free_port

WIRE = "tenfold.realtime.wire:HubProtocol"
ASGI = "websockets-sansio"


class WS:
    """A protocol client: `request` answers by ref, `next` waits for pushed frames."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.refs = itertools.count(1)
        self.pending: list[dict[str, Any]] = []

    async def send(self, obj: Any) -> None:
        await self.conn.send(obj if isinstance(obj, str) else orjson.dumps(obj).decode())

    async def recv(self, timeout_s: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            raw = await self.conn.recv()
        out: dict[str, Any] = orjson.loads(raw)
        return out

    async def request(self, op: str, timeout_s: float = 5.0, **fields: Any) -> dict[str, Any]:
        ref = next(self.refs)
        await self.send({"op": op, "ref": ref, **fields})
        async with asyncio.timeout(timeout_s):
            while True:
                frame = await self.recv(timeout_s)
                if frame.get("ref") == ref:
                    return frame
                self.pending.append(frame)

    async def next(
        self, op: str | None = None, timeout_s: float = 5.0, **match: Any
    ) -> dict[str, Any]:
        """The first frame (pending or new) with `op` and the `match` fields."""

        def fits(f: dict[str, Any]) -> bool:
            return (op is None or f.get("op") == op) and all(
                f.get(k) == v for k, v in match.items()
            )

        for i, f in enumerate(self.pending):
            if fits(f):
                return self.pending.pop(i)
        async with asyncio.timeout(timeout_s):
            while True:
                f = await self.recv(timeout_s)
                if fits(f):
                    return f
                self.pending.append(f)

    async def drain(self, quiet_s: float = 0.2) -> list[dict[str, Any]]:
        """Every frame until none arrives for `quiet_s`."""
        out = list(self.pending)
        self.pending.clear()
        while True:
            try:
                out.append(await self.recv(quiet_s))
            except TimeoutError:
                return out

    async def close_code(self, timeout_s: float = 10.0) -> int | None:
        """Read until the server closes; its close code."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    await self.conn.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


@dataclass
class Served:
    arena: Arena
    port: int

    @property
    def runtime(self) -> Any:
        return self.arena.runtime

    def url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?{query}" if query else "")

    @contextlib.asynccontextmanager
    async def ws(self, user: User | None = None, **options: Any) -> AsyncIterator[WS]:
        """A connection, authenticated with an auth frame when `user` is given."""
        options.setdefault("max_size", 2**24)
        async with connect(self.url(), **options) as conn:
            client = WS(conn)
            if user is not None:
                ok = await client.request("auth", token=user.access)
                assert ok["op"] == "ok" and ok["user"] == user.id, ok
            yield client


@contextlib.asynccontextmanager
async def served_arena(
    settings: Settings, ws: str = WIRE, routes: Sequence[BaseRoute] = ()
) -> AsyncIterator[Served]:
    """arena (FAST settings) behind a real uvicorn on a free port, plus an HTTP client.

    `ws`: uvicorn's WebSocket protocol: tenfold's (`WIRE`, what `tenfold up` runs)
    or `ASGI`, uvicorn's own, which hands /ws to the hub through ASGI. `routes` are
    added to arena's."""
    app = create_app(settings.model_copy(update=FAST))
    app.router.routes.extend(routes)
    await migrate(app.state.tenfold)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ws=ws,
        ws_per_message_deflate=False,
        lifespan="on",
        log_level="warning",
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.02)
        async with client_for(app) as client:
            arena = Arena(app, app.state.tenfold, client)
            await app.state.tenfold.bus.wait_attached()
            yield Served(arena, port)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(15):
                await task
