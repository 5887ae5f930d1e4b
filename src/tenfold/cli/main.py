"""Entry point of the `tenfold` command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from tenfold import __version__
from tenfold.cli import bench, db, events, shards, up
from tenfold.cli.output import errors
from tenfold.errors import TenfoldError

app = typer.Typer(
    name="tenfold",
    help="tenfold: sharded data, events, caching and realtime for Python backends.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(shards.app, name="shards")
app.add_typer(db.app, name="db")
app.add_typer(events.app, name="events")
app.command("up")(up.up)
app.command("bench")(bench.bench)


@app.callback()
def root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", help="A tenfold.toml (default: TENFOLD_CONFIG or ./tenfold.toml)."
    ),
) -> None:
    ctx.obj = {"config": config}


@app.command("version")
def version() -> None:
    """Print tenfold's version."""
    typer.echo(__version__)


def run() -> None:
    """Console-script entry: expected failures print one line, never a traceback."""
    try:
        app()
    except TenfoldError as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    run()
