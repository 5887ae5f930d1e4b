"""`tenfold events`: topic rates, group lag, outbox backlog, dead letters, replays."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, TypeVar

import typer
from rich.progress import Progress
from rich.table import Table

from tenfold.cli.output import console, emit_json, fail, run_async, settings_from
from tenfold.data import ShardedDatabase
from tenfold.errors import TenfoldError, TopicError
from tenfold.events.base import StartPosition, StreamBackend, TopicSpec, backend_from_url

app = typer.Typer(help="Inspect and operate the event log.", no_args_is_help=True)
dlq = typer.Typer(help="Dead-letter queues: list, show, replay, drop.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")

T = TypeVar("T")
JsonOption = typer.Option(False, "--json", help="Print JSON instead of tables.")
TopicOption = typer.Option(..., "--topic", "-t", help="The topic, e.g. chat.messages.")


@asynccontextmanager
async def _connected(ctx: typer.Context) -> AsyncIterator[tuple[ShardedDatabase, StreamBackend]]:
    settings = settings_from(ctx)
    db = ShardedDatabase(settings)
    await db.open(ids=False)
    backend = backend_from_url(
        settings.events_url,
        connect_timeout_s=settings.events_connect_timeout_s,
        publish_timeout_s=settings.events_publish_timeout_s,
    )
    try:
        await backend.start()
        yield db, backend
    finally:
        await backend.close()
        await db.close()


def _run(ctx: typer.Context, body: Callable[[ShardedDatabase, StreamBackend], Awaitable[T]]) -> T:
    async def main() -> T:
        async with _connected(ctx) as (db, backend):
            return await body(db, backend)

    return run_async(main())


async def _topic(backend: StreamBackend, name: str) -> TopicSpec:
    for spec in await backend.topics():
        if spec.name == name:
            return spec
    raise TopicError(
        f"topic {name} does not exist on the broker (memory:// streams live only inside "
        "the app process; use a nats:// TENFOLD_EVENTS_URL to inspect them from outside)"
    )


async def _outbox_pending(db: ShardedDatabase) -> dict[str, int | None]:
    async def one(name: str) -> int | None:
        try:
            async with db.shard(name) as conn:
                return int(
                    await conn.fetchval(
                        "SELECT COUNT(*) FROM tenfold_outbox WHERE published_at IS NULL"
                    )
                    or 0
                )
        except TenfoldError:
            return None

    counts = await asyncio.gather(*(one(n) for n in db.shard_names))
    return dict(zip(db.shard_names, counts, strict=True))


@app.command("status")
def status(
    ctx: typer.Context,
    sample_s: float = typer.Option(1.0, "--sample", help="Seconds between the two rate samples."),
    json: bool = JsonOption,
) -> None:
    """Per topic: messages, publish rate, DLQ size; per group: lag; per shard: outbox backlog."""

    async def body(db: ShardedDatabase, backend: StreamBackend) -> dict[str, Any]:
        specs = await backend.topics()
        before = {s.name: await backend.topic_status(s) for s in specs}
        with Progress(console=console, transient=True, disable=json) as bar:
            task = bar.add_task("sampling rates", total=100)
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < sample_s:
                bar.update(task, completed=100 * elapsed / sample_s)
                await asyncio.sleep(min(0.1, sample_s))
        topics, groups = [], []
        for spec in specs:
            now = await backend.topic_status(spec)
            rate = (now.last_sequence - before[spec.name].last_sequence) / max(sample_s, 1e-9)
            topics.append(
                {**asdict(now), "partitions": spec.partitions, "rate_per_s": round(rate, 1)}
            )
            for group in await backend.groups(spec):
                groups.append(asdict(await backend.group_status(spec, group)))
        return {"topics": topics, "groups": groups, "outbox_pending": await _outbox_pending(db)}

    report = _run(ctx, body)
    if json:
        emit_json(report)
        return
    table = Table(title="topics")
    for col in ("topic", "partitions", "messages", "bytes", "last seq", "rate/s", "DLQ"):
        table.add_column(col, justify="left" if col == "topic" else "right")
    for t in report["topics"]:
        dlq_cell = f"[red]{t['dlq_size']}[/]" if t["dlq_size"] else "0"
        table.add_row(
            t["topic"],
            str(t["partitions"]),
            str(t["messages"]),
            str(t["bytes"]),
            str(t["last_sequence"]),
            f"{t['rate_per_s']:.1f}",
            dlq_cell,
        )
    console.print(table)
    groups = Table(title="consumer groups")
    for col in ("topic", "group", "lag", "in flight"):
        groups.add_column(col, justify="left" if col in ("topic", "group") else "right")
    for g in report["groups"]:
        groups.add_row(g["topic"], g["group"], str(g["lag"]), str(g["in_flight"]))
    console.print(groups)
    outbox = Table(title="outbox backlog")
    outbox.add_column("shard")
    outbox.add_column("unpublished rows", justify="right")
    for shard, n in report["outbox_pending"].items():
        outbox.add_row(shard, "[red]unreachable[/]" if n is None else str(n))
    console.print(outbox)


@dlq.command("list")
def dlq_list(
    ctx: typer.Context,
    topic: str = TopicOption,
    limit: int = typer.Option(100, "--limit", min=1),
    json: bool = JsonOption,
) -> None:
    """List a topic's dead letters: sequence, group, attempts, error."""

    async def body(db: ShardedDatabase, backend: StreamBackend) -> list[dict[str, Any]]:
        letters = await backend.dead_letters(await _topic(backend, topic), limit)
        return [
            {
                "sequence": d.sequence,
                "event_id": d.event.id,
                "key": d.event.key,
                "group": d.group,
                "attempts": d.attempts,
                "error": d.error,
                "failed_at": d.failed_at,
            }
            for d in letters
        ]

    rows = _run(ctx, body)
    if json:
        emit_json({"topic": topic, "dead_letters": rows})
        return
    table = Table(title=f"dead letters of {topic}")
    for col in ("seq", "event id", "key", "group", "attempts", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["sequence"]), r["event_id"], r["key"], r["group"], str(r["attempts"]), r["error"]
        )
    console.print(table)


@dlq.command("show")
def dlq_show(
    ctx: typer.Context, sequence: int, topic: str = TopicOption, json: bool = JsonOption
) -> None:
    """Show one dead letter in full, payload included."""

    async def body(db: ShardedDatabase, backend: StreamBackend) -> dict[str, Any]:
        for d in await backend.dead_letters(await _topic(backend, topic), 100_000):
            if d.sequence == sequence:
                return {
                    "sequence": d.sequence,
                    "group": d.group,
                    "attempts": d.attempts,
                    "error": d.error,
                    "failed_at": d.failed_at,
                    "event": {
                        "id": d.event.id,
                        "topic": d.event.topic,
                        "key": d.event.key,
                        "slot": d.event.slot,
                        "headers": dict(d.event.headers),
                        "payload": d.event.payload.decode(errors="replace"),
                    },
                }
        raise TopicError(
            f"no dead letter {sequence} in the DLQ of {topic}; see `tenfold events dlq list`"
        )

    letter = _run(ctx, body)
    if json:
        emit_json(letter)
    else:
        console.print_json(data=letter)


def _selected(sequence: int | None, everything: bool) -> None:
    if (sequence is not None) != everything:  # exactly one of the two
        return
    raise fail("give one dead-letter SEQUENCE or --all, not both and not neither")


async def _sequences(backend: StreamBackend, spec: TopicSpec, sequence: int | None) -> list[int]:
    """The one dead letter asked for, or (for --all) every one in the DLQ."""
    if sequence is not None:
        return [sequence]
    return [d.sequence for d in await backend.dead_letters(spec, 100_000)]


@dlq.command("replay")
def dlq_replay(
    ctx: typer.Context,
    sequence: int | None = typer.Argument(None),
    topic: str = TopicOption,
    everything: bool = typer.Option(False, "--all"),
    json: bool = JsonOption,
) -> None:
    """Publish dead letters to their topic again (a fresh dedup id) and remove them from the DLQ."""
    _selected(sequence, everything)

    async def body(db: ShardedDatabase, backend: StreamBackend) -> list[int]:
        spec = await _topic(backend, topic)
        seqs = await _sequences(backend, spec, sequence)
        for seq in seqs:
            await backend.replay_dead_letter(spec, seq)
        return seqs

    done = _run(ctx, body)
    emit_json({"replayed": done}) if json else console.print(
        f"replayed {len(done)} dead letter(s) to {topic}"
    )


@dlq.command("drop")
def dlq_drop(
    ctx: typer.Context,
    sequence: int | None = typer.Argument(None),
    topic: str = TopicOption,
    everything: bool = typer.Option(False, "--all"),
    json: bool = JsonOption,
) -> None:
    """Delete dead letters for good."""
    _selected(sequence, everything)

    async def body(db: ShardedDatabase, backend: StreamBackend) -> list[int]:
        spec = await _topic(backend, topic)
        seqs = await _sequences(backend, spec, sequence)
        return [s for s in seqs if await backend.drop_dead_letter(spec, s)]

    done = _run(ctx, body)
    if sequence is not None and not done:
        raise fail(f"no dead letter {sequence} in the DLQ of {topic}")
    emit_json({"dropped": done}) if json else console.print(
        f"dropped {len(done)} dead letter(s) from {topic}"
    )


@app.command("replay")
def replay(
    ctx: typer.Context,
    topic: str = TopicOption,
    group: str = typer.Option(..., "--group", "-g", help="The consumer group to rewind."),
    from_seq: int | None = typer.Option(
        None, "--from-seq", min=1, help="Stream sequence to start at."
    ),
    from_time: str | None = typer.Option(
        None, "--from", help="ISO time to start at, e.g. 2026-11-01T00:00:00Z."
    ),
    clear_inbox: bool = typer.Option(
        True,
        "--clear-inbox/--keep-inbox",
        help="Forget the group's processed event ids so shard-writing handlers apply events again.",
    ),
    json: bool = JsonOption,
) -> None:
    """Rewind a group (from the start, a sequence or a time) to rebuild its projection.

    Stop the group's consumers first; they resume from the new position when restarted.
    """
    if from_seq is not None and from_time is not None:
        raise fail("give --from-seq or --from, not both")
    if from_time is not None:
        try:
            when = dt.datetime.fromisoformat(from_time.replace("Z", "+00:00"))
        except ValueError:
            raise fail(
                f"--from {from_time!r} is not an ISO time like 2026-11-01T00:00:00Z"
            ) from None
        start = StartPosition.at_time(when.replace(tzinfo=when.tzinfo or dt.UTC).timestamp())
    elif from_seq is not None:
        start = StartPosition.at_sequence(from_seq)
    else:
        start = StartPosition()

    async def body(db: ShardedDatabase, backend: StreamBackend) -> dict[str, Any]:
        spec = await _topic(backend, topic)
        await backend.reset_group(spec, group, start)
        cleared = 0
        if clear_inbox:
            for name in db.shard_names:
                async with db.shard(name) as conn:
                    cleared += await conn.execute(
                        "DELETE FROM tenfold_inbox WHERE consumer_group = $1", group
                    )
        return {
            "topic": topic,
            "group": group,
            "start": asdict(start),
            "inbox_rows_cleared": cleared,
        }

    result = _run(ctx, body)
    if json:
        emit_json(result)
    else:
        console.print(
            f"group {group} on {topic} rewound to {from_time or from_seq or 'the start'}; "
            f"{result['inbox_rows_cleared']} inbox row(s) cleared"
        )
