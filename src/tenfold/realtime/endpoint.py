"""The `/ws` route: a Starlette WebSocket route that hands the socket to the hub."""

from __future__ import annotations

from typing import Any

from starlette.routing import WebSocketRoute

from tenfold.realtime.hub import Hub

__all__ = ["route"]


class _Endpoint:
    """A raw ASGI app (not a function, so Starlette does not wrap it in a session)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.hub.serve(scope, receive, send)


def route(hub: Hub, path: str = "/ws") -> WebSocketRoute:
    """A route serving `path` with `hub`."""
    return WebSocketRoute(path, _Endpoint(hub))
