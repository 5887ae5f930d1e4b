"""`tenfold db`: migrate the catalog and every shard, and show where each stands."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tenfold.cli.output import console, emit_json, run_async, settings_from
from tenfold.data import ShardedDatabase
from tenfold.data.schema import DatabaseStatus, migrate_all, schema_status

app = typer.Typer(help="Migrate and inspect the catalog and shard databases.", no_args_is_help=True)

DirOption = typer.Option(
    None,
    "--dir",
    help="App migrations folder (with catalog/ and shard/); default TENFOLD_MIGRATIONS_DIR.",
)


async def _migrate(
    ctx: typer.Context, folder: Path | None, create: bool, show: bool
) -> dict[str, list[str]]:
    db = ShardedDatabase(settings_from(ctx))
    if create:
        await db.catalog.pool.create_database()
    await db.open(ids=False)
    try:
        with Progress(
            TextColumn("[bold]migrating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            disable=not show,
        ) as progress:
            task = progress.add_task("", total=len(db.all_pools()))
            return await migrate_all(
                db,
                folder,
                create=create,
                on_done=lambda name: progress.update(task, advance=1, description=name),
            )
    finally:
        await db.close()


@app.command("migrate")
def migrate(
    ctx: typer.Context,
    folder: Path | None = DirOption,
    create: bool = typer.Option(True, "--create/--no-create", help="Create missing databases."),
    json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Apply pending migrations to the catalog and every shard (idempotent)."""
    applied = run_async(_migrate(ctx, folder, create, show=not json))
    if json:
        emit_json({"applied": applied})
        return
    table = Table(title="tenfold db migrate")
    table.add_column("database")
    table.add_column("applied now", justify="right")
    table.add_column("names")
    for name, names in applied.items():
        table.add_row(name, str(len(names)), ", ".join(names) or "[dim]up to date[/]")
    console.print(table)


async def _status(ctx: typer.Context, folder: Path | None) -> list[DatabaseStatus]:
    db = ShardedDatabase(settings_from(ctx))
    await db.open(ids=False)
    try:
        return await schema_status(db, folder)
    finally:
        await db.close()


@app.command("status")
def status(
    ctx: typer.Context,
    folder: Path | None = DirOption,
    json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show applied and pending migrations and slot-convention problems per database."""
    rows = run_async(_status(ctx, folder))
    if json:
        emit_json({"databases": [asdict(r) for r in rows]})
    else:
        table = Table(title="tenfold db status")
        for col in ("database", "URL", "applied", "pending", "edited", "slot convention"):
            table.add_column(col)
        for r in rows:
            if r.error:
                table.add_row(r.database, r.url, "—", "—", "—", f"[red]{r.error}[/]")
                continue
            convention = (
                "[green]ok[/]" if not r.convention else "[yellow]" + "; ".join(r.convention) + "[/]"
            )
            table.add_row(
                r.database,
                r.url,
                str(r.applied),
                "[yellow]" + ", ".join(r.pending) + "[/]" if r.pending else "[green]none[/]",
                "[red]" + ", ".join(r.changed) + "[/]" if r.changed else "none",
                convention if r.database != "catalog" else "—",
            )
        console.print(table)
    if any(r.error or r.changed for r in rows):
        raise typer.Exit(1)
