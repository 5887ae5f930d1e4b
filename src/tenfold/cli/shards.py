"""`tenfold shards`: the topology, and whether every shard answers."""

from __future__ import annotations

import typer
from rich.table import Table

from tenfold.cli.output import console, emit_json, run_async, settings_from
from tenfold.data import ShardedDatabase
from tenfold.data.router import ShardHealth

app = typer.Typer(help="Show shards, their slot ranges and health.", no_args_is_help=False)


async def _report(ctx: typer.Context) -> tuple[ShardedDatabase, list[ShardHealth]]:
    db = ShardedDatabase(settings_from(ctx))
    await db.open(ids=False)
    try:
        return db, await db.health()
    finally:
        await db.close()


def _rows(db: ShardedDatabase, health: list[ShardHealth]) -> list[dict[str, object]]:
    topo = db.topology
    rows = []
    for h in health:
        ranges = topo.slots_of(h.name)
        rows.append(
            {
                "shard": h.name,
                "url": h.url,
                "slot_ranges": [str(r) for r in ranges],
                "slots": sum(r.size for r in ranges),
                "reachable": h.reachable,
                "rtt_ms": None if h.rtt_ms is None else round(h.rtt_ms, 3),
                "error": h.error,
                "epoch": topo.epoch,
            }
        )
    return rows


def _print(rows: list[dict[str, object]], epoch: int) -> None:
    table = Table(title=f"tenfold shards — topology epoch {epoch}")
    table.add_column("shard")
    table.add_column("URL", overflow="fold")
    table.add_column("slot ranges", overflow="fold")
    table.add_column("slots", justify="right")
    table.add_column("reachable", justify="center")
    table.add_column("rtt ms", justify="right")
    for r in rows:
        ranges = ", ".join(r["slot_ranges"]) or "—"  # type: ignore[arg-type]
        ok = "[green]yes[/]" if r["reachable"] else "[red]no[/]"
        rtt = "—" if r["rtt_ms"] is None else f"{r['rtt_ms']:.2f}"
        table.add_row(str(r["shard"]), str(r["url"]), ranges, str(r["slots"]), ok, rtt)
    console.print(table)
    for r in rows:
        if r["error"]:
            console.print(f"[red]{r['shard']}[/]: {r['error']}", highlight=False)


@app.callback(invoke_without_command=True)
def shards(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show every shard: URL (password hidden), slot ranges, slot count, reachability, RTT."""
    if ctx.invoked_subcommand is not None:
        return
    db, health = run_async(_report(ctx))
    rows = _rows(db, health)
    if json:
        emit_json({"epoch": db.topology.epoch, "shards": rows})
    else:
        _print(rows, db.topology.epoch)


@app.command("check")
def check(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Exit 1 when any shard is unreachable (for health checks and CI)."""
    db, health = run_async(_report(ctx))
    rows = _rows(db, health)
    down = [r["shard"] for r in rows if not r["reachable"]]
    if json:
        emit_json({"epoch": db.topology.epoch, "ok": not down, "unreachable": down, "shards": rows})
    else:
        _print(rows, db.topology.epoch)
        if down:
            console.print(
                f"[bold red]{len(down)} shard(s) unreachable:[/] {', '.join(map(str, down))}"
            )
        else:
            console.print(f"[bold green]all {len(rows)} shards reachable[/]")
    if down:
        raise typer.Exit(1)
