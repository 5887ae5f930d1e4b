"""`tenfold shards`: the topology, whether every shard answers, and moving slots.

tenfold shards add NAME URL          register an empty shard
tenfold shards plan [--to N | --even | --by rows|bytes|load] [--json]
tenfold shards move SLOTS --to NAME [--complete]
tenfold shards rebalance [plan's flags] [--complete]
tenfold shards moves | resume ID | cancel ID | reverse ID | complete ID
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tenfold.cli.output import console, emit_json, fail, run_async, settings_from
from tenfold.data import ShardedDatabase
from tenfold.data.router import ShardHealth
from tenfold.errors import MoveRefused, ReshardError, TenfoldError
from tenfold.reshard import MoveOptions, Mover, MoveRecord, format_ranges
from tenfold.reshard.plan import (
    BY,
    PlannedMove,
    plan_basis,
    plan_moves,
    shard_weights,
    target_shards,
    with_copy_time,
)
from tenfold.reshard.stats import copy_speed, slot_stats
from tenfold.reshard.store import MoveStore

app = typer.Typer(
    help="Show shards, their slot ranges and health; add shards and move slots.",
    no_args_is_help=False,
)


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


# -- resharding: add, plan, move, rebalance, moves, resume/cancel/reverse/complete ----------

T = TypeVar("T")

ByOption = typer.Option("rows", "--by", help="Balance rows, bytes or load (events written/h).")
ToOption = typer.Option(
    None, "--to", min=1, help="Balance over the first N shards of the topology (added ones count)."
)
EvenOption = typer.Option(False, "--even", help="Balance slot counts instead of a weight.")
JsonOption = typer.Option(False, "--json", help="Print JSON instead of tables.")
CompleteOption = typer.Option(
    False, "--complete", help="After the switch, wait for routers and delete the source's copy."
)
BatchOption = typer.Option(2000, "--batch-rows", min=1, help="Rows per copy batch.")
DutyOption = typer.Option(
    0.5, "--duty", min=0.01, max=1.0, help="Share of wall time the copy may work (1: no pause)."
)
RateOption = typer.Option(None, "--max-rows-s", min=1.0, help="Cap on copy rows per second.")


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command: a tenfold error (bad input, a conflict, a failed verify, a bad
    setting, a shard down) is one red line and exit code 1, never a traceback."""
    quiet = logging.getLogger("tenfold.reshard")
    if not quiet.handlers:  # a stopped move is reported once, by the error line below
        quiet.addHandler(logging.NullHandler())
    try:
        return asyncio.run(make())
    except TenfoldError as exc:
        raise fail(str(exc), 1) from None
    except KeyboardInterrupt:
        raise fail(
            "interrupted: the move keeps its state; `tenfold shards moves` lists it, "
            "`tenfold shards resume ID` goes on",
            130,
        ) from None


@contextlib.asynccontextmanager
async def _database(ctx: typer.Context) -> AsyncIterator[ShardedDatabase]:
    db = ShardedDatabase(settings_from(ctx))
    await db.open(ids=False)
    try:
        yield db
    finally:
        await db.close()


class _Bars:
    """Rich progress bars, one per (move, phase), fed by `Mover(on_progress=...)`."""

    def __init__(self, show: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not show,
        )
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.started = False

    def __call__(self, move: MoveRecord, phase: str, done: int, total: int | None) -> None:
        key = (move.id, phase)
        if not self.started:
            self.started = True
            self.progress.start()
        if key not in self.tasks:
            label = f"{move.id} {move.source}->{move.target} {phase}"
            unit = _UNITS.get(phase, "")
            self.tasks[key] = self.progress.add_task(label, total=total, unit=unit)
        self.progress.update(self.tasks[key], completed=done, total=total)

    def __enter__(self) -> _Bars:
        return self  # the live display starts with the first bar: errors print alone

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()


_UNITS = {"copy": "rows", "catch-up": "changes", "verify": "tables", "delete": "rows"}


def _mover(
    db: ShardedDatabase,
    bars: _Bars | None,
    batch_rows: int = 2000,
    duty: float = 0.5,
    max_rows_s: float | None = None,
) -> Mover:
    options = MoveOptions(batch_rows=batch_rows, duty=duty, max_rows_s=max_rows_s)
    return Mover(db, options, on_progress=bars)


def _move_row(m: MoveRecord) -> dict[str, Any]:
    return m.to_dict()


def _print_moves(moves: Sequence[MoveRecord], title: str) -> None:
    table = Table(title=title)
    table.add_column("id", no_wrap=True)
    table.add_column("from->to", no_wrap=True)
    table.add_column("slots", overflow="fold", min_width=9)
    table.add_column("state", no_wrap=True)
    table.add_column("copied/total", justify="right")
    table.add_column("pause ms", justify="right")
    table.add_column("error", overflow="fold")
    colour = {"completed": "green", "switched": "cyan", "reversed": "yellow", "cancelled": "dim"}
    for m in moves:
        p = m.progress
        copied = f"{int(p.get('copied_rows', 0)):,}/{int(p.get('total_rows', 0)):,}" if p else "—"
        pause = p.get("pause_ms")
        state = f"[{colour[m.state]}]{m.state}[/]" if m.state in colour else m.state
        table.add_row(
            m.id,
            f"{m.source}->{m.target}",
            format_ranges(m.slots),
            state,
            copied,
            "—" if pause is None else f"{float(pause):.1f}",
            f"[red]{m.error.partition(':')[0]}[/]" if m.error else "",
        )
    console.print(table)
    for m in moves:
        if m.error:
            console.print(f"[red]{m.id}[/]: {m.error}", highlight=False)


def _emit_moves(moves: Sequence[MoveRecord], json: bool, title: str) -> None:
    if json:
        emit_json({"moves": [_move_row(m) for m in moves]})
    else:
        _print_moves(moves, title)


@app.command("add")
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The new shard's name, e.g. s4."),
    url: str = typer.Argument(..., help="Its database URL (created and migrated if missing)."),
    folder: Path | None = typer.Option(
        None,
        "--dir",
        help="The app's migrations folder (with shard/); default TENFOLD_MIGRATIONS_DIR.",
    ),
    json: bool = JsonOption,
) -> None:
    """Register an empty shard: create and migrate it, list it in a new topology epoch."""

    async def go() -> dict[str, Any]:
        async with _database(ctx) as db:
            topology = await db.add_shard(name, url, folder)
            return {
                "shard": name,
                "url": db.pool(name).safe_url,
                "epoch": topology.epoch,
                "shards": list(topology.shards),
                "slots": topology.slot_count(name),
            }

    out = _run(go)
    if json:
        emit_json(out)
        return
    console.print(
        f"[bold green]added[/] shard {name} ({out['url']}) at topology epoch {out['epoch']}, "
        f"owning {out['slots']} slots; `tenfold shards plan` shows the moves that fill it",
        highlight=False,
    )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"  # pragma: no cover


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


async def _plan(
    db: ShardedDatabase, to: int | None, even: bool, by: str
) -> tuple[list[PlannedMove], dict[str, Any]]:
    if by not in BY:
        raise MoveRefused(f"--by {by}: choose rows, bytes or load")
    stats = await slot_stats(db)
    held = await MoveStore(db.catalog).holders(range(4096))
    frozen = {slot for slots in held.values() for slot in slots}
    moves = plan_moves(db.topology, db.shard_names, stats, to=to, even=even, by=by, frozen=frozen)
    basis = plan_basis(stats, by, even)
    sources = sorted({m.source for m in moves}, key=list(db.topology.shards).index)
    speed = await copy_speed(db, stats, sources or None)
    moves = with_copy_time(moves, speed.rows_s)
    per_slot = (
        [1.0] * 4096
        if basis == "slots"
        else [float(stats.of(basis).get(s, 0)) for s in range(4096)]
    )
    before = shard_weights(db.topology, per_slot, [])
    after = shard_weights(db.topology, per_slot, moves)
    info = {
        "epoch": db.topology.epoch,
        "by": by,
        "even": even,
        "balanced": basis,
        "targets": target_shards(db.topology, db.shard_names, to),
        "moves": [m.to_dict() for m in moves],
        "shards": {n: {"before": before[n], "after": after[n]} for n in db.topology.shards},
        "copy_rows_s": None if speed.rows_s is None else round(speed.rows_s, 1),
        "copy_speed": speed.method,
        "bytes_method": stats.bytes_method,
        "load_window_s": stats.load_window_s,
        "held": {move_id: format_ranges(slots) for move_id, slots in held.items()},
        "total_copy_s": None
        if speed.rows_s is None
        else round(sum(m.copy_s or 0.0 for m in moves), 3),
    }
    return moves, info


def _print_plan(info: dict[str, Any]) -> None:
    basis = info["balanced"]
    if info["even"]:
        what = "slot counts"
    elif basis == "slots":
        what = f"slot counts (no {info['by']} recorded yet)"
    elif basis == "load":
        what = "load (events written in the last hour)"
    else:
        what = basis
    moves = info["moves"]
    if not moves:
        console.print(
            f"[bold green]balanced[/]: {what} are within 5% over {', '.join(info['targets'])}; "
            "nothing to move",
            highlight=False,
        )
    else:
        table = Table(title=f"tenfold shards plan — epoch {info['epoch']}, balancing {what}")
        table.add_column("source->target")
        table.add_column("slots", overflow="fold")
        table.add_column("slot count", justify="right")
        table.add_column("rows", justify="right")
        table.add_column("bytes", justify="right")
        table.add_column("est. copy", justify="right")
        for m in moves:
            table.add_row(
                f"{m['source']}->{m['target']}",
                m["slots"],
                str(m["slot_count"]),
                f"{m['rows']:,}",
                _fmt_bytes(m["bytes"]),
                _fmt_s(m["copy_s"]),
            )
        console.print(table)
    shards = Table(title=f"{what} per shard")
    shards.add_column("shard")
    shards.add_column("now", justify="right")
    shards.add_column("after", justify="right")
    for name, v in info["shards"].items():
        fmt = _fmt_bytes if basis == "bytes" else (lambda x: f"{x:,.0f}")
        shards.add_row(name, fmt(v["before"]), fmt(v["after"]))
    console.print(shards)
    for move_id, ranges in info["held"].items():
        console.print(
            f"[yellow]slots {ranges} stay put[/]: unfinished move {move_id} holds them "
            "(finish it with `tenfold shards resume`/`complete`, or `cancel`/`reverse` it, "
            "then plan again)",
            highlight=False,
        )
    speed = info["copy_rows_s"]
    console.print(
        f"copy speed: {'unknown' if speed is None else f'{speed:,.0f} rows/s'}, "
        f"{info['copy_speed']}; bytes: {info['bytes_method']}",
        highlight=False,
    )


@app.command("plan")
def plan(
    ctx: typer.Context,
    to: int | None = ToOption,
    even: bool = EvenOption,
    by: str = ByOption,
    json: bool = JsonOption,
) -> None:
    """Print the moves that would balance the cluster; changes nothing."""

    async def go() -> dict[str, Any]:
        async with _database(ctx) as db:
            return (await _plan(db, to, even, by))[1]

    info = _run(go)
    if json:
        emit_json(info)
    else:
        _print_plan(info)


async def _run_moves(mover: Mover, moves: Sequence[MoveRecord], complete: bool) -> list[MoveRecord]:
    """Run `moves` concurrently to the switch (or completion). One that fails does not
    stop the others; the failures are then raised together, each naming its move."""
    until = "completed" if complete else "switched"
    results = await asyncio.gather(
        *(mover.run(m.id, until=until) for m in moves), return_exceptions=True
    )
    done: list[MoveRecord] = []
    failed: list[str] = []
    for m, result in zip(moves, results, strict=True):
        if isinstance(result, MoveRecord):
            done.append(result)
        elif isinstance(result, TenfoldError):
            failed.append(
                f"move {m.id} ({m.source}->{m.target} {format_ranges(m.slots)}) stopped: "
                f"{result} (`tenfold shards resume {m.id}` once fixed, or `cancel {m.id}`)"
            )
        else:
            raise result
    if failed:
        raise ReshardError("; ".join(failed))
    return done


@app.command("move")
def move(
    ctx: typer.Context,
    slots: str = typer.Argument(..., help="Slot ranges, like 0-255,1024."),
    to: str = typer.Option(..., "--to", help="The shard that gets the slots."),
    complete: bool = CompleteOption,
    json: bool = JsonOption,
    batch_rows: int = BatchOption,
    duty: float = DutyOption,
    max_rows_s: float | None = RateOption,
) -> None:
    """Move slots to shard --to online: copy, catch up, verify, switch (then --complete)."""

    async def go() -> list[MoveRecord]:
        async with _database(ctx) as db:
            with _Bars(show=not json) as bars:
                mover = _mover(db, bars, batch_rows, duty, max_rows_s)
                started = await mover.start(slots, to)
                return await _run_moves(mover, started, complete)

    _emit_moves(_run(go), json, "tenfold shards move")


@app.command("rebalance")
def rebalance(
    ctx: typer.Context,
    to: int | None = ToOption,
    even: bool = EvenOption,
    by: str = ByOption,
    complete: bool = CompleteOption,
    json: bool = JsonOption,
    batch_rows: int = BatchOption,
    duty: float = DutyOption,
    max_rows_s: float | None = RateOption,
) -> None:
    """Plan, then start and run every planned move concurrently."""

    async def go() -> tuple[dict[str, Any], list[MoveRecord]]:
        async with _database(ctx) as db:
            planned, info = await _plan(db, to, even, by)
            with _Bars(show=not json) as bars:
                mover = _mover(db, bars, batch_rows, duty, max_rows_s)
                started: list[MoveRecord] = []
                try:
                    for p in planned:
                        started += await mover.start(list(p.slots), p.target)
                except TenfoldError:
                    for m in started:  # all or nothing: no half-started plan stays behind
                        with contextlib.suppress(TenfoldError):
                            await mover.cancel(m.id)
                    raise
                return info, await _run_moves(mover, started, complete)

    info, done = _run(go)
    if json:
        emit_json({"plan": info, "moves": [_move_row(m) for m in done]})
    elif not done:
        _print_plan(info)
    else:
        _print_moves(done, "tenfold shards rebalance")


@app.command("moves")
def moves(ctx: typer.Context, json: bool = JsonOption) -> None:
    """List move workflows: state, rows copied, write pause, error."""

    async def go() -> list[MoveRecord]:
        async with _database(ctx) as db:
            return await Mover(db).moves()

    found = _run(go)
    if not found and not json:
        console.print("no moves yet: `tenfold shards plan` suggests some")
        return
    _emit_moves(found, json, "tenfold shards moves")


def _refuse_finished(move: MoveRecord, what: str) -> None:
    """A finished move asked to change course is a clear refusal, not a silent no-op
    (the workflow returns a finished move as it is; repeating the same end is fine)."""
    done = {"cancel": "cancelled", "reverse": "reversed", "complete": "completed"}
    if not move.finished or what == "resume" or done.get(what) == move.state:
        return
    back = f"`tenfold shards move {format_ranges(move.slots)} --to {move.source}`"
    why = {
        "completed": f"its slots stay on {move.target} (to give them back: {back})",
        "reversed": f"its slots are back on {move.source}",
        "cancelled": f"its slots never left {move.source}",
    }[move.state]
    raise MoveRefused(f"move {move.id} is already {move.state}, so it cannot {what}: {why}")


def _operate(
    ctx: typer.Context,
    move_id: str,
    json: bool,
    what: str,
    complete: bool = False,
    tuning: tuple[int, float, float | None] = (2000, 0.5, None),
) -> None:
    async def go() -> MoveRecord:
        async with _database(ctx) as db:
            _refuse_finished(await MoveStore(db.catalog).get(move_id), what)
            with _Bars(show=not json) as bars:
                mover = _mover(db, bars, *tuning)
                if what == "resume":
                    return await mover.run(move_id, until="completed" if complete else "switched")
                if what == "cancel":
                    return await mover.cancel(move_id)
                if what == "reverse":
                    return await mover.reverse(move_id)
                return await mover.complete(move_id)

    _emit_moves([_run(go)], json, f"tenfold shards {what}")


@app.command("resume")
def resume(
    ctx: typer.Context,
    move_id: str = typer.Argument(..., help="The move's id (`tenfold shards moves`)."),
    complete: bool = CompleteOption,
    json: bool = JsonOption,
    batch_rows: int = BatchOption,
    duty: float = DutyOption,
    max_rows_s: float | None = RateOption,
) -> None:
    """Resume a move from its stored state (after the mover died or failed)."""
    _operate(ctx, move_id, json, "resume", complete, (batch_rows, duty, max_rows_s))


@app.command("cancel")
def cancel(
    ctx: typer.Context,
    move_id: str = typer.Argument(..., help="The move's id."),
    json: bool = JsonOption,
) -> None:
    """Abandon a move before its switch: the source keeps the slots."""
    _operate(ctx, move_id, json, "cancel")


@app.command("reverse")
def reverse(
    ctx: typer.Context,
    move_id: str = typer.Argument(..., help="The move's id."),
    json: bool = JsonOption,
) -> None:
    """Give a switched move's slots back to the source, with every change since."""
    _operate(ctx, move_id, json, "reverse")


@app.command("complete")
def complete(
    ctx: typer.Context,
    move_id: str = typer.Argument(..., help="The move's id."),
    json: bool = JsonOption,
) -> None:
    """Finish a switched move: delete the moved rows from the source."""
    _operate(ctx, move_id, json, "complete")
