"""arena: the reference app. `create_app()` is what `tenfold up` serves.

Users, rooms with messages, a points wallet with cross-shard transfers, and a
leaderboard, on tenfold's sharded data, event log, cache, limits and gateway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from apps.arena import accounts, leaderboard, rooms, topics, wallet
from tenfold.config import Settings, load_settings
from tenfold.gateway import Runtime, install

# Every error leaves as an RFC 9457 problem (tenfold.gateway.problems); documented
# once for every route so clients and schema-driven tests know what to expect.
_PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "request_id": {"type": "string"},
    },
}
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "description": text,
        "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
    }
    for status, text in (
        (400, "A body that cannot be read as text (not UTF-8)"),
        (401, "Not authenticated"),
        (403, "Forbidden"),
        (404, "Not found"),
        (409, "Conflict"),
        (413, "Request body too large"),
        (422, "Invalid request"),
        (429, "Too many requests"),
        (503, "Overloaded or a shard unavailable; retry after Retry-After"),
    )
}
MIGRATIONS = Path(__file__).parent / "migrations"
STATIC = Path(__file__).parent / "static"
# Added to the configured rules unless the configuration names them itself. A rule
# applies only to the routes it names (tenfold.limits.rules); one naming none is
# checked by arena itself.
RATE_LIMITS = {
    "register": "600/minute burst 200 per ip on POST /auth/register",
    # Failed logins, counted by accounts.login: per account they stop a guesser
    # however many IPs it has; per IP, looser, they stop one client guessing
    # across accounts without locking out a NAT of users. A correct login counts
    # against neither, and attempts refused before hashing count against no IP.
    "login_account": "10/minute burst 10 per account",
    "login_ip": "120/minute burst 60 per ip",
}


def arena_settings(settings: Settings | None = None) -> Settings:
    """The settings with arena's migrations folder and rate-limit rules filled in."""
    s = settings or load_settings()
    updates: dict[str, object] = {"rate_limits": {**RATE_LIMITS, **s.rate_limits}}
    if s.migrations_dir is None:
        updates["migrations_dir"] = MIGRATIONS
    return s.model_copy(update=updates)


def mount_web(app: FastAPI) -> None:
    """The chat page at `/` and its files under `/static` (plain HTML and JavaScript, no build)."""

    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new arena app with tenfold installed (nothing is contacted until start-up)."""
    app = FastAPI(
        title="arena",
        version="0.1.0",
        description="tenfold's reference app: rooms, messages, a points wallet, a leaderboard.",
    )
    runtime = Runtime(arena_settings(settings))
    runtime.bus.topic(topics.MESSAGES)
    wallet.register_consumers(runtime.bus)
    leaderboard.register_consumers(runtime.bus)
    rooms.register_consumers(runtime.bus)
    rooms.register_realtime(runtime)
    # Routes are matched in order: the busiest (chat) first.
    for module in (rooms, wallet, accounts, leaderboard):
        _add_routes(app, module.router)
    mount_web(app)
    install(app, runtime)
    _docs_last(app)
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """`app.include_router(router, responses=PROBLEM_RESPONSES)`, flattened.

    Since FastAPI 0.137 an included router stays a node of the route tree, and
    a request under it is matched twice more (the node's pass, then its
    handle's): about 15 µs of arena's send-message request. An `APIRouter`
    route already carries its prefix, tags and dependencies, so it can join the
    app's own list. arena sets no app-wide dependencies or dependency overrides,
    the two things this way of including would skip.
    """
    for route in router.routes:
        if isinstance(route, APIRoute):
            route.responses = {**PROBLEM_RESPONSES, **route.responses}
        app.router.routes.append(route)


def _docs_last(app: FastAPI) -> None:
    """Move FastAPI's schema and docs routes behind the API's: every request is
    matched against each route ahead of its own (a measurable cost per route
    on the send-message path, docs/load-testing.md), and these are rarely hit."""
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    first = [r for r in app.router.routes if getattr(r, "path", None) not in docs]
    app.router.routes[:] = first + [r for r in app.router.routes if r not in first]
