"""The peer of `realtime_fanout` and `realtime_memory`: a python-socketio server.

`create_app()` is a `socketio.AsyncServer` in ASGI mode (websocket transport
only, no long-polling, default ping interval), served by `tenfold up
benchmarks.socketio_peer:create_app` so it runs under exactly the same uvicorn
options as tenfold's hub (uvloop, httptools, the same WebSocket implementation,
the same worker count). Two events:

- `join(room)`: the client enters the room (acknowledged, so the load generator
  knows when it is subscribed);
- `pub({"ch": room, ...})`: the server emits `msg` with the same payload to the
  room (the publisher is not in it).

With several workers, cross-worker fan-out goes through Redis: with
`SOCKETIO_REDIS_URL` set, the server uses `socketio.AsyncRedisManager` (its
documented multi-worker setup: every emit is published on a Redis channel and
every worker delivers it to its own clients). Without it, the default in-process
manager (one worker). `SOCKETIO_REDIS_CHANNEL` names the channel, so runs
never hear each other. `/healthz` answers 200 for the harness.
"""

from __future__ import annotations

import os
from typing import Any


async def _healthz(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    ok = scope["path"] == "/healthz"
    await send(
        {
            "type": "http.response.start",
            "status": 200 if ok else 404,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"alive":true}' if ok else b""})


def create_app() -> Any:
    import socketio

    url = os.environ.get("SOCKETIO_REDIS_URL")
    manager = None
    if url:
        channel = os.environ.get("SOCKETIO_REDIS_CHANNEL", "socketio")
        manager = socketio.AsyncRedisManager(url, channel=channel)
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        transports=["websocket"],
        cors_allowed_origins=[],
        max_http_buffer_size=16 * 1024,  # the hub's default frame limit
    )

    @sio.event
    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        return "ok"

    @sio.event
    async def pub(sid: str, data: dict[str, Any]) -> None:
        await sio.emit("msg", data, room=data["ch"])

    return socketio.ASGIApp(sio, other_asgi_app=_healthz)
