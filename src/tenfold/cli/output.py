"""How the CLI prints: Rich tables for people, `--json` for machines, one line per error."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import typer
from rich.console import Console

from tenfold.config import Settings, load_settings
from tenfold.errors import TenfoldError

T = TypeVar("T")
console = Console()
errors = Console(stderr=True)


def emit_json(data: Any) -> None:
    """Print `data` as indented JSON on stdout (nothing else is printed with --json)."""
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one red line on stderr and return the Exit to raise."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def settings_from(ctx: typer.Context) -> Settings:
    config: Path | None = (ctx.obj or {}).get("config")
    return load_settings(config)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; tenfold errors become one line and exit code 2."""
    try:
        return asyncio.run(coro)
    except TenfoldError as exc:
        raise fail(str(exc)) from None
