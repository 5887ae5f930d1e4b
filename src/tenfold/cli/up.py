"""`tenfold up [APP]`: migrate, then serve an app (arena by default) with granian or uvicorn.

Embedded mode (the default settings): SQLite shards under ./data, in-process
events and cache, nothing else to run. `--stack local` first starts
PostgreSQL, NATS and Redis from the machine's binaries (see `tenfold.cli.stack`).

SIGTERM or Ctrl-C: uvicorn stops accepting, waits for in-flight requests (at
most `drain_timeout_s`), then the app's lifespan stops consumers, drains the
outbox and closes the pools.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
from typing import Any

import typer
from rich.table import Table

from tenfold.cli.output import console, fail, settings_from
from tenfold.config import Settings, redact_url
from tenfold.errors import ConfigError, TenfoldError

APPS = {"arena": "apps.arena.app:create_app"}


def resolve(app: str) -> str:
    """The `module:factory` import string of `app` (a known name or the string itself)."""
    target = APPS.get(app, app)
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ConfigError(
            "APP", f"{app!r} is neither a known app ({', '.join(APPS)}) nor 'module:factory'"
        )
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("APP", f"cannot import {target!r}: {exc}") from exc
    if not callable(factory):
        raise ConfigError("APP", f"{target!r} is not callable")
    return target


def effective_settings(target: str, settings: Settings) -> Settings:
    """The settings the app will run with (an app may add its migrations and rules)."""
    module = importlib.import_module(target.partition(":")[0])
    adjust = getattr(module, "arena_settings", None) or getattr(module, "app_settings", None)
    result: Settings = adjust(settings) if adjust is not None else settings
    return result


SERVERS = ("uvicorn", "granian")
# A tie with granian on HTTP throughput (docs/load-testing.md); uvicorn carries
# the hub's own WebSocket protocol (7.4 KiB per idle connection, not 29.6).
DEFAULT_SERVER = "uvicorn"


async def migrate(settings: Settings) -> dict[str, list[str]]:
    from tenfold.data import ShardedDatabase

    async with ShardedDatabase(settings) as db:
        return await db.migrate()


def describe(
    target: str, settings: Settings, host: str, port: int, workers: int, server: str = "uvicorn"
) -> Table:
    table = Table(title=f"tenfold up: {target}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("where")
    table.add_row("serving", f"http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    table.add_row("server", f"{server}, {workers} worker(s)")
    mode = "embedded" if settings.events_url.startswith("memory") else "services"
    table.add_row("mode", mode)
    shards = settings.shard_specs()
    table.add_row("shards", f"{len(shards)}: {redact_url(shards[0].url)} …")
    table.add_row("catalog", redact_url(settings.catalog_url))
    table.add_row("events", redact_url(settings.events_url))
    table.add_row("cache L2", redact_url(settings.cache_url))
    table.add_row("rate limits", redact_url(settings.limits_url))
    table.add_row("health", "/healthz  /readyz  /metrics")
    return table


def up(
    ctx: typer.Context,
    app: str = typer.Argument("arena", help="'arena' or a 'module:factory' returning an ASGI app."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(1, min=1, max=64, help="Worker processes behind one port."),
    stack: str = typer.Option(
        "embedded", help="'embedded' (SQLite, in-process events) or 'local' (start services)."
    ),
    server: str = typer.Option(
        DEFAULT_SERVER,
        help="'uvicorn' (httptools + uvloop; /ws on tenfold's own WebSocket protocol; "
        "see docs/load-testing.md) or 'granian' (pip install granian).",
    ),
) -> None:
    """Migrate and serve APP (arena by default); Ctrl-C or SIGTERM drains and stops."""
    if stack not in ("embedded", "local"):
        raise fail(f"--stack must be 'embedded' or 'local', got {stack!r}")
    try:
        target = resolve(app)
        settings = settings_from(ctx)
        env: dict[str, str] = {}
        if stack == "local":
            from tenfold.cli.stack import start_local_stack

            env = start_local_stack(settings)
            os.environ.update(env)
            settings = settings_from(ctx)
        settings = effective_settings(target, settings)
        if workers > 1 and settings.events_url.startswith("memory"):
            raise ConfigError(
                "--workers",
                "in-process events (TENFOLD_EVENTS_URL=memory://) cannot be shared by several "
                "worker processes; use --workers 1, or --stack local (NATS) for more workers",
            )
        applied = asyncio.run(migrate(settings))
    except TenfoldError as exc:
        raise fail(str(exc)) from None
    fresh = sum(len(v) for v in applied.values())
    console.print(describe(target, settings, host, port, workers, server))
    console.print(f"migrations: {fresh} applied" if fresh else "migrations: up to date")
    serve(target, host, port, workers, settings, server)


def pick_server(server: str) -> str:
    """The server `--server` names, checked (granian is an optional dependency)."""
    if server not in SERVERS:
        raise fail(f"--server must be one of {', '.join(SERVERS)}, got {server!r}")
    if server == "granian" and importlib.util.find_spec("granian") is None:
        raise fail("--server granian needs granian: pip install 'tenfold[bench]' or granian")
    return server


def serve(target: str, host: str, port: int, workers: int, settings: Settings, server: str) -> None:
    """Run the ASGI server in the foreground until SIGTERM/SIGINT."""
    server = pick_server(server)
    if server == "granian":
        serve_granian(target, host, port, workers, settings)
        return
    import uvicorn

    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "loop": "uvloop",
        "http": "httptools",
        # /ws: tenfold's own protocol serves the hub with no task per idle
        # connection (realtime/wire.py); other WebSocket routes get uvicorn's
        # sans-I/O one. No per-message deflate (frames are small JSON,
        # compression costs CPU and memory per connection); frames over the
        # hub's bound are refused by the hub itself (close 4000), so the server
        # only needs to stop absurd ones.
        "ws": "tenfold.realtime.wire:HubProtocol",
        "ws_per_message_deflate": False,
        "ws_max_size": max(64 * 1024, 4 * settings.realtime_max_frame_bytes),
        "lifespan": "on",
        "access_log": False,
        "timeout_graceful_shutdown": int(max(1, settings.drain_timeout_s)),
        "log_level": settings.log_level.lower(),
    }
    uvicorn.run(target, **options)


def serve_granian(target: str, host: str, port: int, workers: int, settings: Settings) -> None:
    """granian (Rust HTTP, ASGI interface with lifespan, uvloop), `workers` processes."""
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.log import LogLevels

    level = settings.log_level.lower()
    Granian(
        target,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        factory=True,
        log_access=False,
        log_level=LogLevels(level) if level in LogLevels.__members__ else LogLevels.info,
        workers_kill_timeout=int(max(1, settings.drain_timeout_s)),
    ).serve()
