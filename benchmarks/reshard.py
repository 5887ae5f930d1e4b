"""Online resharding (issue 14): copy speed against PostgreSQL's COPY, the write pause, arena p99.

    python -m benchmarks.reshard [--quick] [--json PATH]
    python -m benchmarks issue14          # writes benchmarks/results/issue14-reshard.json

Everything runs on a private PostgreSQL cluster started for the run
(`tenfold.observe.services.PostgresCluster` in a temporary directory, fsync
off for both sides alike), never on a shared server. Three measurements:

1. Copy speed. N rows (200k; 20k with `--quick`) of arena's tables
   (arena_users, arena_wallets, arena_messages from apps/arena/migrations, a
   quarter, a quarter and a half of the rows) in slots 0-255 of shard s0, and
   as many again in slots 256-2047 (rows that stay). The mover
   (`MoveOptions(duty=1.0)`, default batch) copies slots 0-255 to s1; its
   figure is `progress["copy_rows_s"]`, the copy phase alone (keyset scans,
   the target's delete-then-COPY per batch, the catalog checkpoint per
   batch). The peer is the limit for moving those rows between the same two
   databases: `COPY (SELECT ... WHERE slot BETWEEN 0 AND 255) TO STDOUT` on
   s0 streamed straight into `COPY ... FROM STDIN` on s1 (asyncpg
   `copy_from_query` -> `copy_to_table` through a bounded queue, no
   buffering of the whole table), into tables made `LIKE ... INCLUDING ALL`
   (same indexes and constraints, no tenfold trigger), in text and in binary
   format; the faster format's median is the peer. After each mover round the
   move is reversed (slots back to s0, s1's copy deleted) and both databases
   are vacuumed; the peer's tables are truncated before each of its rounds.
   3 rounds, the order alternating; medians. Goal: mover >= 0.5x COPY.

2. The write pause. 16 writers (8 on keys of slots 0-255, 8 on keys that
   stay), each a closed loop of `db.transaction_for(key, insert a message)`
   through its own `ShardedDatabase` (the mover has another, as a separate
   router process would: the writers learn of the switch through SlotMoved
   and a catalog re-read, not by sharing the mover's topology). Five moves of
   slots 0-255 s0 -> s1 (20k rows there; 2k quick), each reversed afterwards.
   Figures: `progress["pause_ms"]` (fence to the new epoch, server side) per
   move, and the client side: the slowest write to a moving slot that was in
   flight around the switch (from 1 s before the fence to 1 s after it),
   with p50/p99 over the moves, and the longest gap between two completed
   writes of one moving-slot writer. Goal: p99 <= 1 s.

3. Arena's send-message latency during a move. `tenfold up arena` (uvicorn,
   1 worker, events memory://, admission control off, limits raised) on two
   PostgreSQL shards; a load generator in its own process (httpx, 16
   concurrent closed loops) posts to 8 rooms, 4 of them in the 256 slots that
   move (which also hold extra seeded messages so that the move takes a
   while). Windows alternate: baseline, move, baseline, move, baseline, move
   (two pairs with `--quick`; each move goes back the other way, default
   `MoveOptions` (duty 0.5), run to completed through the Python API in this
   process, so the mover's CPU is on the same 2 cores). A baseline window is
   the 18 s after the client's first 2 s; a move window is the move's start
   to its end (copy, catch-up, verify, switch, the wait for routers, the
   delete), and "copy..switch" its start to the switch. Figures: p50/p99 and
   req/s per window, medians over the pairs; non-2xx answers are counted.

Recorded run (benchmarks/results/issue14-reshard.json, load average 1.19 at
the start, other engineers' tests running meanwhile): copy 0.478x COPY (goal
0.5x, missed narrowly); switch pause p99 66 ms server side, 98 ms as the
slowest write a client saw (goal 1 s); arena send-message p99 1.39x during a
move, no failed request. The figures swing with the box's load: an earlier
run at load average 6.3 gave copy 0.322x and arena 0.78x (baselines noisier
than the move's effect).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
from rich.table import Table

from benchmarks._common import console, median
from benchmarks._common import main as run_main
from tenfold.config import Settings, ShardSpec
from tenfold.data import ShardedDatabase
from tenfold.ids import slot_of_id
from tenfold.keyspace import slot_of
from tenfold.observe.services import (
    PostgresCluster,
    create_databases,
    database_url,
    free_port,
)
from tenfold.reshard import MoveOptions, Mover

ROOT = Path(__file__).resolve().parent.parent
ARENA = ROOT / "apps" / "arena" / "migrations"
MOVING = (0, 255)
TABLES = ("arena_users", "arena_wallets", "arena_messages")
HASH = "$argon2id$v=19$m=65536,t=3,p=4$" + "c2FsdHNhbHRzYWx0" + "x" * 43
BODY = "hello from the benchmark, a message of ordinary length"
WRITERS = 16
COPY_GOAL, PAUSE_GOAL_MS = 0.5, 1000.0


# -- the private cluster ------------------------------------------------------


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields its admin URL."""
    root = Path(tempfile.mkdtemp(prefix="tfbench-reshard-pg-"))
    pg = PostgresCluster(root, free_port(), durable=False)
    missing = pg.missing()
    if missing:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"cannot start PostgreSQL: {missing}")
    try:
        pg.prepare()
        pg.init()
        pg.start()
        yield pg.url
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def settings_for(admin: str, prefix: str, shards: int = 2, **extra: Any) -> Settings:
    return Settings(
        catalog_url=database_url(admin, f"{prefix}_cat"),
        shards=[
            ShardSpec(name=f"s{n}", url=database_url(admin, f"{prefix}_{n}")) for n in range(shards)
        ],
        migrations_dir=ARENA,
        pool_max_size=8,
        log_level="WARNING",
        **extra,
    )


async def make_databases(admin: str, prefix: str, shards: int = 2) -> None:
    names = [f"{prefix}_cat", *(f"{prefix}_{n}" for n in range(shards))]
    await create_databases(admin, names)


@contextlib.asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[ShardedDatabase]:
    db = ShardedDatabase(settings)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


def _rows(table: str, n: int, lo: int, hi: int, base: int) -> list[tuple[Any, ...]]:
    width = hi - lo + 1
    out: list[tuple[Any, ...]] = []
    for i in range(n):
        slot, ident = lo + i % width, base + i
        if table == "arena_users":
            out.append((slot, ident, f"user{ident}", HASH, 1.7e9 + i))
        elif table == "arena_wallets":
            out.append((slot, ident, 100 + i % 1000))
        else:
            out.append((slot, ident, 7, ident % 1000, f"user{ident % 1000}", BODY, None, 1.7e9))
    return out


async def seed(url: str, per_range: int, ranges: list[tuple[int, int]]) -> None:
    """`per_range` arena rows (1/4 users, 1/4 wallets, 1/2 messages) in each slot range."""
    split = {"arena_users": per_range // 4, "arena_wallets": per_range // 4}
    split["arena_messages"] = per_range - 2 * (per_range // 4)
    conn = await asyncpg.connect(url)
    try:
        for k, (lo, hi) in enumerate(ranges):
            for table, n in split.items():
                await conn.copy_records_to_table(
                    table, records=_rows(table, n, lo, hi, 10**9 * (k + 1))
                )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def vacuum(*urls: str) -> None:
    for url in urls:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# -- 1. copy speed ------------------------------------------------------------


async def peer_copy(src_url: str, dst_url: str, fmt: str) -> tuple[int, float]:
    """COPY TO STDOUT on the source streamed into COPY FROM STDIN on the target."""
    src, dst = await asyncpg.connect(src_url), await asyncpg.connect(dst_url)
    try:
        await dst.execute(f"TRUNCATE {', '.join(f'peer_{t}' for t in TABLES)}")
        moved = 0
        started = time.perf_counter()
        for table in TABLES:
            queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

            async def produce(table: str = table, queue: Any = queue) -> None:
                try:
                    await src.copy_from_query(
                        f"SELECT * FROM {table} WHERE slot BETWEEN {MOVING[0]} AND {MOVING[1]}",
                        output=queue.put,
                        format=fmt,
                    )
                finally:
                    await queue.put(None)

            async def chunks(queue: Any = queue) -> AsyncIterator[bytes]:
                while (chunk := await queue.get()) is not None:
                    yield chunk

            _, status = await asyncio.gather(
                produce(), dst.copy_to_table(f"peer_{table}", source=chunks(), format=fmt)
            )
            moved += int(str(status).split()[-1])
        return moved, time.perf_counter() - started
    finally:
        await src.close()
        await dst.close()


async def part_copy(admin: str, quick: bool) -> dict[str, Any]:
    n = 20_000 if quick else 200_000
    rounds = 3
    prefix = "copy"
    await make_databases(admin, prefix)
    settings = settings_for(admin, prefix)
    src_url, dst_url = (s.url for s in settings.shards)
    async with opened(settings) as db:
        await db.migrate()
        assert db.topology.shard_of_slot(0) == "s0" and db.topology.shard_of_slot(2047) == "s0"
        await seed(src_url, n, [MOVING, (256, 2047)])
        conn = await asyncpg.connect(dst_url)
        for table in TABLES:
            await conn.execute(f"CREATE TABLE peer_{table} (LIKE {table} INCLUDING ALL)")
        await conn.close()
        mover = Mover(db, MoveOptions(duty=1.0))
        sides: dict[str, list[dict[str, Any]]] = {"mover": [], "COPY text": [], "COPY binary": []}

        async def run_mover() -> None:
            t0 = time.perf_counter()
            [move] = await mover.move(f"{MOVING[0]}-{MOVING[1]}", "s1")
            took = time.perf_counter() - t0
            p = move.progress
            assert p["copied_rows"] == n, p
            sides["mover"].append(
                {
                    "rows": p["copied_rows"],
                    "rows_s": p["copy_rows_s"],
                    "to_switched_s": round(took, 3),
                    "pause_ms": p["pause_ms"],
                }
            )
            await mover.reverse(move.id)
            await vacuum(src_url, dst_url)

        async def run_peer(fmt: str) -> None:
            moved, took = await peer_copy(src_url, dst_url, fmt)
            assert moved == n, moved
            sides[f"COPY {fmt}"].append({"rows": moved, "rows_s": round(moved / took, 1)})
            await vacuum(dst_url)

        await peer_copy(src_url, dst_url, "binary")  # warm the caches once
        for i in range(rounds):
            steps = [run_mover, lambda: run_peer("text"), lambda: run_peer("binary")]
            for step in steps if i % 2 == 0 else steps[::-1]:
                await step()
            console.print(
                "  round "
                + str(i + 1)
                + ": "
                + ", ".join(f"{k} {v[-1]['rows_s']:,.0f} rows/s" for k, v in sides.items()),
                highlight=False,
            )
    medians = {k: median([r["rows_s"] for r in v]) for k, v in sides.items()}
    peer = max(("COPY text", "COPY binary"), key=lambda k: medians[k])
    ratio = medians["mover"] / medians[peer]
    return {
        "rows": n,
        "rounds": rounds,
        "mover_options": "MoveOptions(duty=1.0): copy_batch_rows 10000 (PostgreSQL byte copy)",
        "sides": sides,
        "medians_rows_s": medians,
        "peer": peer,
        "ratio_mover_vs_copy": round(ratio, 3),
        "goal_ratio": COPY_GOAL,
        "goal_met": ratio >= COPY_GOAL,
    }


# -- 2. the write pause ---------------------------------------------------------


def keys_in(lo: int, hi: int, count: int, tag: str) -> list[str]:
    found: list[str] = []
    i = 0
    while len(found) < count:
        key = f"{tag}{i}"
        if lo <= slot_of(key) <= hi:
            found.append(key)
        i += 1
    return found


async def part_pause(admin: str, quick: bool) -> dict[str, Any]:
    moves = 3 if quick else 5
    prefix = "pause"
    await make_databases(admin, prefix)
    settings = settings_for(admin, prefix)
    async with opened(settings) as mover_db, opened(settings) as writer_db:
        await mover_db.migrate()
        await seed(settings.shards[0].url, 2_000 if quick else 20_000, [MOVING])
        mover = Mover(mover_db)
        moving_keys = keys_in(*MOVING, WRITERS // 2, "m")
        other_keys = keys_in(256, 4095, WRITERS // 2, "o")
        # (writer, moving?, started wall time, latency s, error or None)
        writes: list[tuple[int, bool, float, float, str | None]] = []
        stop = asyncio.Event()

        async def writer(w: int, key: str, moving: bool) -> None:
            async def insert(conn: Any) -> None:
                await conn.insert(
                    "arena_messages",
                    {
                        "id": writer_db.new_id(key),
                        "room_id": w,
                        "author_id": w,
                        "author": key,
                        "body": BODY,
                        "idem_key": None,
                        "created_at": time.time(),
                    },
                )

            while not stop.is_set():
                wall, t0 = time.time(), time.perf_counter()
                error = None
                try:
                    await writer_db.transaction_for(key, insert)
                except Exception as exc:  # counted: a write the move failed
                    error = type(exc).__name__
                    await asyncio.sleep(0.01)
                writes.append((w, moving, wall, time.perf_counter() - t0, error))

        tasks = [
            asyncio.create_task(writer(w, key, w < WRITERS // 2))
            for w, key in enumerate([*moving_keys, *other_keys])
        ]
        records: list[dict[str, Any]] = []
        try:
            await asyncio.sleep(1.0)
            for _ in range(moves):
                [move] = await mover.move(f"{MOVING[0]}-{MOVING[1]}", "s1")
                p = move.progress
                fence_at = float(p["switched_at"]) - float(p["pause_ms"]) / 1000
                await asyncio.sleep(1.5)
                back = await mover.reverse(move.id)
                records.append(
                    {
                        "pause_ms": p["pause_ms"],
                        "fence_at": fence_at,
                        "switched_at": p["switched_at"],
                        "copied_rows": p["copied_rows"],
                        "reverse_pause_ms": back.progress.get("reverse_pause_ms"),
                    }
                )
                await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    per_move = []
    for rec in records:
        lo, hi = rec["fence_at"] - 1.0, rec["fence_at"] + 1.0
        around = [x for x in writes if x[1] and x[2] < hi and x[2] + x[3] > lo]
        gaps = []
        for w in range(WRITERS // 2):
            ends = sorted(x[2] + x[3] for x in writes if x[0] == w and lo - 5 < x[2] < hi + 5)
            gaps += [b - a for a, b in itertools.pairwise(ends) if lo <= b and a <= hi]
        per_move.append(
            {
                "pause_ms": rec["pause_ms"],
                "reverse_pause_ms": rec["reverse_pause_ms"],
                "writes_around": len(around),
                "stall_max_ms": round(max((x[3] for x in around), default=0.0) * 1000, 2),
                "write_p50_ms": round(pct([x[3] for x in around], 50) * 1000, 2),
                "write_p99_ms": round(pct([x[3] for x in around], 99) * 1000, 2),
                "gap_max_ms": round(max(gaps, default=0.0) * 1000, 2),
                "errors": sum(1 for x in around if x[4]),
            }
        )
    calm = [
        x[3] * 1000
        for x in writes
        if not any(r["fence_at"] - 1.0 < x[2] < r["fence_at"] + 1.0 for r in records)
        and x[4] is None
    ]
    pauses = [m["pause_ms"] for m in per_move]
    stalls = [m["stall_max_ms"] for m in per_move]
    errors: dict[str, int] = {}
    for x in writes:
        if x[4]:
            errors[x[4]] = errors.get(x[4], 0) + 1
    return {
        "moves": moves,
        "writers": WRITERS,
        "moving_writers": WRITERS // 2,
        "writes": len(writes),
        "writes_per_s": round(len(writes) / (writes[-1][2] - writes[0][2]), 1),
        "errors": errors,
        "per_move": per_move,
        "pause_ms_p50": pct(pauses, 50),
        "pause_ms_p99": pct(pauses, 99),
        "client_stall_ms_p50": pct(stalls, 50),
        "client_stall_ms_p99": pct(stalls, 99),
        "gap_ms_max": max(m["gap_max_ms"] for m in per_move),
        "write_ms_p50_away_from_switch": round(pct(calm, 50), 2),
        "write_ms_p99_away_from_switch": round(pct(calm, 99), 2),
        "goal_ms": PAUSE_GOAL_MS,
        "goal_met": pct(stalls, 99) <= PAUSE_GOAL_MS and not errors,
    }


# -- 3. arena send-message during a move -------------------------------------------


def load_child() -> None:
    """The load generator's process: argv url token rooms(json) max-seconds out concurrency
    stop-file (it stops at max-seconds or once stop-file exists)."""
    import httpx

    url, token, rooms_json, seconds, out, conc, stop_file = sys.argv[1:8]
    rooms: list[str] = json.loads(rooms_json)

    bodies: list[str] = []

    async def main() -> list[tuple[float, float, int, int]]:
        samples: list[tuple[float, float, int, int]] = []
        stopped = False
        headers = {"Authorization": f"Bearer {token}"}
        limits = httpx.Limits(max_connections=int(conc), max_keepalive_connections=int(conc))
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            stop = time.monotonic() + float(seconds)

            async def loop(i: int) -> None:
                while time.monotonic() < stop and not stopped:
                    r = i % len(rooms)
                    i += 1
                    wall, t0 = time.time(), time.perf_counter()
                    try:
                        reply = await client.post(
                            f"/rooms/{rooms[r]}/messages", json={"body": BODY}, headers=headers
                        )
                        status = reply.status_code
                        if not 200 <= status < 300 and len(bodies) < 20:
                            bodies.append(f"{wall:.3f} {status} {reply.text[:300]}")
                    except httpx.HTTPError as exc:
                        status = 0
                        if len(bodies) < 20:
                            bodies.append(f"{wall:.3f} 0 {type(exc).__name__}: {exc}")
                    samples.append((wall, time.perf_counter() - t0, status, r))

            async def watch() -> None:
                nonlocal stopped
                while time.monotonic() < stop and not stopped:
                    stopped = await asyncio.to_thread(os.path.exists, stop_file)
                    await asyncio.sleep(0.05)

            await asyncio.gather(watch(), *(loop(i) for i in range(int(conc))))
        return samples

    samples = asyncio.run(main())
    Path(out).write_text(json.dumps({"samples": samples, "errors": bodies}))


def arena_env(admin: str, prefix: str) -> dict[str, str]:
    from benchmarks.gateway_overhead import base_env

    shard = database_url(admin, f"{prefix}_{{n}}")
    return base_env(
        shard,
        database_url(admin, f"{prefix}_cat"),
        TENFOLD_SHARD_COUNT="2",
        TENFOLD_ADMISSION_ENABLED="false",
    )


def arena_setup(url: str) -> tuple[str, list[str], list[str]]:
    """A user and rooms: (token, 4 rooms in one aligned 256-slot range, 4 rooms elsewhere)."""
    import httpx

    creds = {"username": f"bench{os.getpid()}", "password": "bench-password-1"}
    with httpx.Client(base_url=url, timeout=10) as c:
        c.post("/auth/register", json=creds).raise_for_status()
        token = c.post("/auth/login", json=creds).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        inside: list[str] = []
        outside: list[str] = []
        lo = None
        n = 0
        while len(inside) < 4 or len(outside) < 4:
            reply = c.post("/rooms", json={"name": f"r{n}"}, headers=auth)
            reply.raise_for_status()
            room = str(reply.json()["id"])
            n += 1
            slot = slot_of_id(int(room))
            if lo is None:
                lo = slot - slot % 256
            if lo <= slot <= lo + 255:
                if len(inside) < 4:
                    inside.append(room)
            elif len(outside) < 4:
                outside.append(room)
    return token, inside, outside


def window(
    samples: list[list[Any]], lo: float, hi: float, rooms: set[int] | None
) -> dict[str, Any]:
    chosen = [s for s in samples if lo <= s[0] < hi and (rooms is None or s[3] in rooms)]
    ok = [s[1] * 1000 for s in chosen if 200 <= s[2] < 300]
    return {
        "requests": len(chosen),
        "per_s": round(len(chosen) / (hi - lo), 1) if hi > lo else 0.0,
        "non_2xx": len(chosen) - len(ok),
        "statuses": {
            str(c): sum(1 for s in chosen if s[2] == c) for c in sorted({s[2] for s in chosen})
        },
        "p50_ms": round(pct(ok, 50), 2),
        "p99_ms": round(pct(ok, 99), 2),
        "max_ms": round(max(ok, default=0.0), 2),
    }


def log_errors(work: Path) -> list[str]:
    """Up to 20 error lines of each arena server log in `work`."""
    logged: list[str] = []
    for path in sorted(work.glob("arena-*.log")):
        lines = path.read_text(errors="replace").splitlines()
        logged += [line[:400] for line in lines if "ERROR" in line or "Error" in line][:20]
    return logged


async def part_arena(admin: str, quick: bool, work: Path) -> dict[str, Any]:
    from benchmarks.gateway_overhead import server

    seconds = 8.0 if quick else 20.0  # a baseline window
    pairs = 2 if quick else 3
    extra_rows = 20_000 if quick else 150_000
    prefix = "arena"
    await make_databases(admin, prefix)
    env = arena_env(admin, prefix)
    settings = Settings(
        catalog_url=database_url(admin, f"{prefix}_cat"),
        shards=[ShardSpec(name=f"s{n}", url=database_url(admin, f"{prefix}_{n}")) for n in (0, 1)],
        log_level="WARNING",
    )
    windows: list[dict[str, Any]] = []
    with server("arena", env, logdir=work) as url:
        token, inside, outside = await asyncio.to_thread(arena_setup, url)
        rooms = [*inside, *outside]
        lo = slot_of_id(int(inside[0]))
        lo -= lo % 256
        ranges = f"{lo}-{lo + 255}"
        async with opened(settings) as db:
            owner = db.topology.shard_of_slot(lo)
            owner_url = next(s.url for s in settings.shards if s.name == owner)
            await seed(owner_url, extra_rows, [(lo, lo + 255)])
            marks: dict[str, float] = {}

            def progress(move: Any, phase: str, done: int, total: int | None) -> None:
                marks.setdefault(phase, time.time())

            mover = Mover(db, on_progress=progress)
            for i, kind in enumerate(("baseline", "move") * pairs):
                out, stop_file = work / f"load{i}.json", work / f"stop{i}"
                cmd = [
                    sys.executable,
                    "-c",
                    "from benchmarks.reshard import load_child; load_child()",
                    url,
                    token,
                    json.dumps(rooms),
                    str(seconds + 300),
                    str(out),
                    str(WRITERS),
                    str(stop_file),
                ]
                child = await asyncio.create_subprocess_exec(
                    *cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
                )
                started = time.time()
                info: dict[str, Any] = {"kind": kind}
                await asyncio.sleep(2.0)  # the client's start-up and warm-up
                if kind == "move":
                    to = "s1" if db.topology.shard_of_slot(lo) == "s0" else "s0"
                    marks.clear()
                    t0 = time.time()
                    [move] = await mover.move(ranges, to, until="completed")
                    t1 = time.time()
                    switched = float(move.progress["switched_at"])
                    info.update(
                        {
                            "to": to,
                            "move_s": round(t1 - t0, 2),
                            "to_switch_s": round(switched - t0, 2),
                            "copied_rows": move.progress["copied_rows"],
                            "copy_rows_s": move.progress.get("copy_rows_s"),
                            "pause_ms": move.progress["pause_ms"],
                            "state": move.state,
                        }
                    )
                    spans = {"move": (t0, t1), "copy to switch": (t0, switched)}
                    if "delete" in marks:
                        spans["delete"] = (marks["delete"], t1)
                    await asyncio.sleep(1.0)
                else:
                    await asyncio.sleep(seconds - 2.0)
                    spans = {"move": (started + 2.0, time.time())}
                await asyncio.to_thread(stop_file.touch)
                await asyncio.wait_for(child.wait(), 120)
                loaded = json.loads(await asyncio.to_thread(out.read_text))
                samples = loaded["samples"]
                info["error_samples"] = loaded["errors"][:5]
                for name, span in spans.items():
                    label = "all" if name == "move" else name
                    info[label] = window(samples, *span, None)
                info["span_s"] = round(spans["move"][1] - spans["move"][0], 2)
                info["moving_rooms"] = window(samples, *spans["move"], {0, 1, 2, 3})
                info["other_rooms"] = window(samples, *spans["move"], {4, 5, 6, 7})
                info["whole_run_non_2xx"] = sum(1 for s in samples if not 200 <= s[2] < 300)
                windows.append(info)
                a = info["all"]
                console.print(
                    f"  {kind}: {a['per_s']:.0f} req/s, p50 {a['p50_ms']:.1f} ms, "
                    f"p99 {a['p99_ms']:.1f} ms, non-2xx {a['non_2xx']}"
                    + (
                        f"; move {info['move_s']} s, copy..switch {info['to_switch_s']} s: "
                        f"p99 {info['copy to switch']['p99_ms']:.1f} ms"
                        if kind == "move"
                        else ""
                    ),
                    highlight=False,
                )
    logged = await asyncio.to_thread(log_errors, work)
    base = [w for w in windows if w["kind"] == "baseline"]
    moved = [w for w in windows if w["kind"] == "move"]
    b99 = median([w["all"]["p99_ms"] for w in base])
    m99 = median([w["all"]["p99_ms"] for w in moved])
    c99 = median([w["copy to switch"]["p99_ms"] for w in moved])
    return {
        "baseline_seconds": seconds,
        "pairs": pairs,
        "concurrency": WRITERS,
        "extra_rows_in_moving_slots": extra_rows,
        "slots": ranges,
        "windows": windows,
        "baseline_p99_ms": b99,
        "move_p99_ms": m99,
        "copy_to_switch_p99_ms": c99,
        "ratio_p99_move_vs_baseline": round(m99 / b99, 3),
        "ratio_p99_copy_to_switch_vs_baseline": round(c99 / b99, 3),
        "baseline_p50_ms": median([w["all"]["p50_ms"] for w in base]),
        "move_p50_ms": median([w["all"]["p50_ms"] for w in moved]),
        "baseline_per_s": median([w["all"]["per_s"] for w in base]),
        "move_per_s": median([w["all"]["per_s"] for w in moved]),
        "non_2xx_during_moves": sum(w["all"]["non_2xx"] for w in moved),
        "non_2xx_in_baselines": sum(w["all"]["non_2xx"] for w in base),
        "server_log_errors": logged,
    }


# -- the run ----------------------------------------------------------------------


def code_state() -> dict[str, Any]:
    """The commit measured, and the files of the mover that differed from it (work in progress)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted": git(
            "status", "--short", "--", "src/tenfold/reshard", "src/tenfold/data"
        ).splitlines(),
    }


async def _run(quick: bool, work: Path) -> dict[str, Any]:
    with cluster() as admin:
        load = os.getloadavg()[0]
        parts = os.environ.get("TENFOLD_BENCH_RESHARD_PARTS", "copy,pause,arena").split(",")
        out: dict[str, Any] = {}
        if "copy" in parts:
            console.print("copy speed")
            out["copy"] = await part_copy(admin, quick)
        if "pause" in parts:
            console.print("write pause")
            out["pause"] = await part_pause(admin, quick)
        if "arena" in parts:
            console.print("arena send-message")
            out["arena"] = await part_arena(admin, quick, work)
        return {
            "loadavg_1m_at_start": load,
            "loadavg_1m_at_end": os.getloadavg()[0],
            "postgres": "private cluster (PostgresCluster, fsync off), 127.0.0.1",
            "code": await asyncio.to_thread(code_state),
            **out,
        }


def run(quick: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tfbench-reshard-"))
    try:
        return asyncio.run(_run(quick, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def goal_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    if "copy" in result:
        c = result["copy"]
        lines.append(
            f"copy >= {c['goal_ratio']:g}x COPY: {'met' if c['goal_met'] else 'NOT met'} "
            f"({c['ratio_mover_vs_copy']:.3f}x {c['peer']})"
        )
    if "pause" in result:
        p = result["pause"]
        lines.append(
            f"write pause p99 <= {p['goal_ms']:g} ms: {'met' if p['goal_met'] else 'NOT met'} "
            f"(server pause p50 {p['pause_ms_p50']:.1f} / p99 {p['pause_ms_p99']:.1f} ms; "
            f"client stall p50 {p['client_stall_ms_p50']:.1f} / "
            f"p99 {p['client_stall_ms_p99']:.1f} ms; failed writes {p['errors'] or 0})"
        )
    if "arena" in result:
        a = result["arena"]
        lines.append(
            f"arena send-message p99 during a move / without: "
            f"{a['ratio_p99_move_vs_baseline']:.3f}x ({a['move_p99_ms']:.1f} vs "
            f"{a['baseline_p99_ms']:.1f} ms; non-2xx during moves {a['non_2xx_during_moves']})"
        )
    return lines


def render(result: dict[str, Any]) -> Table:
    table = Table(
        title="online resharding: copy speed, write pause, arena p99 (private PostgreSQL)",
        caption="\n".join(goal_lines(result))
        + f"\nload average 1m {result['loadavg_1m_at_start']:.2f}"
        f" at start, {result['loadavg_1m_at_end']:.2f} at end",
    )
    for col in ("measure", "side", "figure", "ratio"):
        table.add_column(col, justify="left" if col in ("measure", "side") else "right")
    if "copy" in result:
        c = result["copy"]
        peer = c["medians_rows_s"][c["peer"]]
        for side, value in c["medians_rows_s"].items():
            table.add_row(
                f"copy {c['rows']:,} rows", side, f"{value:,.0f} rows/s", f"{value / peer:.3f}x"
            )
    if "pause" in result:
        p = result["pause"]
        rows = [
            ("server pause_ms p50/p99", f"{p['pause_ms_p50']:.1f} / {p['pause_ms_p99']:.1f}"),
            (
                "client stall p50/p99 (moves)",
                f"{p['client_stall_ms_p50']:.1f} / {p['client_stall_ms_p99']:.1f}",
            ),
            ("longest writer gap", f"{p['gap_ms_max']:.1f}"),
            (
                "write p50/p99 away from switch",
                f"{p['write_ms_p50_away_from_switch']:.1f} / "
                f"{p['write_ms_p99_away_from_switch']:.1f}",
            ),
        ]
        for k, (side, figure) in enumerate(rows):
            table.add_row("write pause" if k == 0 else "", side, f"{figure} ms", "")
    if "arena" in result:
        a = result["arena"]
        table.add_row(
            "arena send-message",
            "baseline p99",
            f"{a['baseline_p99_ms']:.1f} ms ({a['baseline_per_s']:.0f}/s)",
            "1.000x",
        )
        table.add_row(
            "",
            "during move p99",
            f"{a['move_p99_ms']:.1f} ms ({a['move_per_s']:.0f}/s)",
            f"{a['ratio_p99_move_vs_baseline']:.3f}x",
        )
        table.add_row(
            "",
            "copy..switch p99",
            f"{a['copy_to_switch_p99_ms']:.1f} ms",
            f"{a['ratio_p99_copy_to_switch_vs_baseline']:.3f}x",
        )
    return table


if __name__ == "__main__":
    raise SystemExit(run_main("reshard", __doc__ or "", run, render))
