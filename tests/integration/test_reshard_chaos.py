"""The move's proof under load and kill -9, on PostgreSQL and SQLite.

Writers run arena's writes for the whole move (messages into rooms, wallet
transfers between users on other slots, registrations, each with its outbox
event in the same transaction) through `transaction_for*`, so a write refused
with SlotMoved is run again on the new owner. Every committed key is tracked
client-side; afterwards `Load.check` dumps every slot table by key, routed by
the final topology, and asserts:

- 0 lost, 0 extra, 0 duplicated rows per table; no shard keeps rows of slots it
  does not own once the moves completed;
- every wallet's balance is what the committed debits and credits make it, and
  the sum of balances never changed;
- outbox: no relay runs, so the observable is the rows: every committed event
  id is unpublished on exactly one shard (the owner of its slot), no unknown
  event exists, and every other row of it (the old owner's copy, marked
  published when it was carried) counts in the moves' `carried_events`. A relay
  publishes exactly the unpublished rows, once each.

A write that failed ambiguously (the shard died mid-commit) is retried with the
same keys: a unique-key refusal then means the earlier attempt committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tenfold.config import Settings
from tenfold.data import ShardedDatabase
from tenfold.data.base import Connection, Insert
from tenfold.errors import (
    ConstraintViolation,
    DataError,
    MoveConflict,
    SlotMoved,
)
from tenfold.events.base import Event, TopicSpec
from tenfold.events.memory import MemoryStreams
from tenfold.events.outbox import ROW as OUTBOX_ROW
from tenfold.events.outbox import event_of_row, outbox_row
from tenfold.events.relay import OutboxRelay
from tenfold.gateway.auth.refresh import RefreshTokens
from tenfold.ids import slot_of_id
from tenfold.keyspace import slot_of
from tenfold.reshard import MoveOptions, Mover, MoveRecord, parse_slots
from tests import services

ROOT = Path(__file__).resolve().parents[2]
ARENA = ROOT / "apps" / "arena" / "migrations"
MESSAGES, TRANSFERS, USERS = (
    TopicSpec("arena.messages"),
    TopicSpec("arena.transfers"),
    TopicSpec("arena.users"),
)
TABLES = {
    "arena_users": "id",
    "arena_wallets": "user_id",
    "arena_rooms": "id",
    "arena_messages": "id",
    "arena_transfers": "id",
    "arena_credits": "transfer_id",
}
START_BALANCE = 1000
# The writers' pause between writes. Kept moderate: a steady stream to the moving
# slots makes verify drain forever (test_verify_ends_under_a_steady_write_stream).
PAUSE_S = float(os.environ.get("TENFOLD_TEST_RESHARD_PAUSE_S", "0.03"))


class Insufficient(Exception):
    """The sender's balance does not cover the transfer: roll back, nothing happened."""


class Load:
    """Arena's writes against `db`, with every committed key and balance tracked."""

    def __init__(
        self, db: ShardedDatabase, moving: set[int], seed: int = 7, *, logins: bool = False
    ) -> None:
        self.db = db
        # Logins issue refresh tokens (a slot table of tenfold's own) through the
        # gateway's RefreshTokens, which retries a write refused mid-move itself.
        self.logins = logins
        self.tokens = RefreshTokens(db)
        self.tables = {**TABLES, "tenfold_refresh_tokens": "token_id"} if logins else TABLES
        self.moving = moving
        self.rng = random.Random(seed)
        self.users: dict[str, int] = {}
        self.senders: list[str] = []
        self.balance: dict[int, int] = {}
        self.rooms: list[int] = []
        self.keys: dict[str, set[int]] = {t: set() for t in self.tables}
        self.events: set[str] = set()
        self.stats: Counter[str] = Counter()
        self.errors: list[str] = []
        self.unpublished: list[tuple[str, str]] = []
        self.stop = asyncio.Event()
        self._names = 0
        self._tasks: list[asyncio.Task[None]] = []

    # -- keys, biased towards the moving slots ----------------------------

    def _key(self, prefix: str, moving: bool | None = None) -> str:
        want = self.rng.random() < 0.7 if moving is None else moving
        while True:
            self._names += 1
            key = f"{prefix}{self._names}"
            if (slot_of(key) in self.moving) == want:
                return key

    # -- committing -------------------------------------------------------

    async def commit(self, slot: int, fn: Callable[[Connection], Awaitable[None]]) -> bool:
        """Run `fn` on `slot`'s owner until it commits; False if it refused (Insufficient).

        `transaction_for_slot` retries SlotMoved itself; past its wait (a mover
        killed while the slots are fenced) this keeps retrying. After an ambiguous
        failure, a unique-key refusal means the earlier attempt committed.
        """
        ambiguous = False
        calls = 0

        async def counted(conn: Connection) -> None:
            nonlocal calls
            calls += 1
            await fn(conn)

        while True:
            try:
                await self.db.transaction_for_slot(slot, counted)
                self.stats["commits"] += 1
                # More calls than one: refused (SlotMoved, rolled back) and run again.
                self.stats["retried"] += calls - 1
                return True
            except Insufficient:
                return False
            except ConstraintViolation:
                if not ambiguous:
                    raise
                self.stats["resolved_ambiguous"] += 1
                return True
            except SlotMoved:
                self.stats["slot_moved_past_wait"] += 1
            except DataError as exc:
                ambiguous = True
                self.stats[f"error {type(exc).__name__}"] += 1
                if len(self.errors) < 20:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)

    # -- arena's writes ---------------------------------------------------

    async def register(self, name: str, balance: int) -> None:
        uid = self.db.new_id(name)
        event = outbox_row(USERS, name, {"user_id": uid, "name": name})

        async def fn(conn: Connection) -> None:
            await conn.insert(
                "arena_users",
                {"id": uid, "username": name, "password_hash": "x", "created_at": time.time()},
            )
            await conn.insert("arena_wallets", {"user_id": uid, "balance": balance})
            await conn.insert_together([Insert("tenfold_outbox", event, sharded=False)])

        assert await self.commit(slot_of(name), fn)
        self.users[name] = uid
        self.balance[uid] = balance
        self.keys["arena_users"].add(uid)
        self.keys["arena_wallets"].add(uid)
        self.events.add(str(event["event_id"]))
        if balance:
            self.senders.append(name)

    async def login(self) -> None:
        uid = self.users[self.rng.choice(sorted(self.users))]
        issued = await self.tokens.issue(uid)
        self.keys["tenfold_refresh_tokens"].add(int(issued.token.split(".", 1)[0]))
        self.stats["logins"] += 1

    async def new_room(self) -> None:
        rid = self.db.new_id(self._key("room"))
        owner = self.users[self.rng.choice(self.senders)]

        async def fn(conn: Connection) -> None:
            await conn.insert(
                "arena_rooms",
                {"id": rid, "name": f"r{rid}", "owner_id": owner, "created_at": time.time()},
            )

        assert await self.commit(slot_of_id(rid), fn)
        self.rooms.append(rid)
        self.keys["arena_rooms"].add(rid)

    async def send(self) -> None:
        rid = self.rng.choice(self.rooms)
        author = self.rng.choice(self.senders)
        mid = self.db.new_id_beside(rid)  # routes like its room
        now = time.time()
        row = {
            "id": mid,
            "room_id": rid,
            "author_id": self.users[author],
            "author": author,
            "body": f"hello {mid}",
            "idem_key": None,
            "created_at": now,
        }
        event = outbox_row(MESSAGES, f"room:{rid}", {"id": mid, "room_id": rid})
        # Arena keys this event "room:{rid}", whose slot is not the room's: that
        # row is then fenced by a slot the write is not in (reported as a core
        # bug; test_outbox_event_of_an_unmoved_room_is_refused_after_a_move).
        # Here the event carries its row's slot, as the outbox fence expects.
        event["slot"] = slot_of_id(rid)

        async def fn(conn: Connection) -> None:
            await conn.insert_together(
                [Insert("arena_messages", row), Insert("tenfold_outbox", event, sharded=False)]
            )

        if await self.commit(slot_of_id(rid), fn):
            self.keys["arena_messages"].add(mid)
            self.events.add(str(event["event_id"]))

    async def transfer(self) -> None:
        sender = self.rng.choice(self.senders)
        while True:
            recipient = self.rng.choice(list(self.users))
            if slot_of(recipient) != slot_of(sender):
                break
        sid, rid, amount = self.users[sender], self.users[recipient], self.rng.randint(1, 9)
        tid = self.db.new_id_beside(sid)
        event = outbox_row(TRANSFERS, sender, {"transfer_id": tid, "amount": amount})

        async def debit(conn: Connection) -> None:
            await conn.insert(
                "arena_transfers",
                {
                    "id": tid,
                    "sender_id": sid,
                    "recipient": recipient,
                    "amount": amount,
                    "idem_key": str(tid),
                    "status": "pending",
                    "reason": None,
                    "created_at": time.time(),
                },
            )
            n = await conn.execute(
                "UPDATE arena_wallets SET balance = balance - $2 "
                "WHERE user_id = $1 AND balance >= $2",
                sid,
                amount,
            )
            if not n:
                raise Insufficient
            await conn.insert_together([Insert("tenfold_outbox", event, sharded=False)])

        async def credit(conn: Connection) -> None:
            await conn.insert(
                "arena_credits",
                {"transfer_id": tid, "user_id": rid, "amount": amount, "created_at": time.time()},
            )
            await conn.execute(
                "UPDATE arena_wallets SET balance = balance + $2 WHERE user_id = $1", rid, amount
            )

        if not await self.commit(slot_of_id(sid), debit):
            return
        self.balance[sid] -= amount
        self.keys["arena_transfers"].add(tid)
        self.events.add(str(event["event_id"]))
        # The money is in flight until the credit commits: it always does.
        assert await self.commit(slot_of_id(rid), credit)
        self.balance[rid] += amount
        self.keys["arena_credits"].add(tid)

    # -- running ----------------------------------------------------------

    async def seed(self, users: int = 60, rooms: int = 12, messages: int = 150) -> None:
        for _ in range(users):
            await self.register(self._key("user"), START_BALANCE)
        for _ in range(rooms):
            await self.new_room()
        for _ in range(messages):
            await self.send()
        self.total = sum(self.balance.values())

    async def _loop(self, step: Callable[[], Awaitable[None]], pause_s: float) -> None:
        while not self.stop.is_set():
            await step()
            await asyncio.sleep(pause_s)

    async def _register_loop(self, pause_s: float) -> None:
        while not self.stop.is_set():
            await self.register(self._key("new"), 0)
            self.stats["registered"] += 1
            await asyncio.sleep(pause_s * 2)

    def start(self, pause_s: float = PAUSE_S) -> None:
        """Two senders, two transferrers and a registrar, each pausing `pause_s` between writes."""
        loops = [
            self._loop(self.send, pause_s),
            self._loop(self.send, pause_s),
            self._loop(self.transfer, pause_s),
            self._loop(self.transfer, pause_s),
            self._register_loop(pause_s),
        ]
        if self.logins:
            loops.append(self._loop(self.login, pause_s))
        self._tasks = [asyncio.create_task(c) for c in loops]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)

    # -- the invariants ---------------------------------------------------

    async def check(
        self,
        moves: list[MoveRecord],
        *,
        completed: bool = True,
        relayed: bool = False,
        carried_exact: bool = True,
        db: ShardedDatabase | None = None,
    ) -> None:
        db = db or self.db
        await db.refresh_topology()
        topo = db.topology
        owned: dict[str, list[int]] = {t: [] for t in self.tables}
        stray: list[tuple[str, str, int]] = []
        for name in topo.shards:
            async with db.shard(name) as conn:
                for table, key in self.tables.items():
                    for slot, k in await conn.fetch(f"SELECT slot, {key} FROM {table}"):
                        if topo.shard_of_slot(int(slot)) == name:
                            owned[table].append(int(k))
                        else:
                            stray.append((name, table, int(k)))
        for table in self.tables:
            got = Counter(owned[table])
            dup = [k for k, n in got.items() if n > 1]
            lost = self.keys[table] - set(got)
            extra = set(got) - self.keys[table]
            assert not dup and not lost and not extra, (table, len(dup), lost, extra)
        if completed:
            assert not stray, f"rows left on shards that no longer own their slot: {stray[:5]}"
        wallets: dict[int, int] = {}
        for name in topo.shards:
            async with db.shard(name) as conn:
                for slot, uid, bal in await conn.fetch(
                    "SELECT slot, user_id, balance FROM arena_wallets"
                ):
                    if topo.shard_of_slot(int(slot)) == name:
                        wallets[int(uid)] = int(bal)
        assert sum(wallets.values()) == self.total
        assert wallets == self.balance
        if relayed:
            await self._check_relayed(db)
            return
        unpublished: list[str] = []
        published: list[str] = []
        for name in topo.shards:
            async with db.shard(name) as conn:
                for eid, slot, pub in await conn.fetch(
                    "SELECT event_id, slot, published_at FROM tenfold_outbox"
                ):
                    if pub is None:
                        assert topo.shard_of_slot(int(slot)) == name, (eid, slot, name)
                        unpublished.append(str(eid))
                    else:
                        published.append(str(eid))
        once = Counter(unpublished)
        assert [e for e, n in once.items() if n > 1] == []
        assert set(once) == self.events, (
            len(set(once) - self.events),
            len(self.events - set(once)),
        )
        # The only published rows are the old owners' copies of carried events,
        # each with its live (unpublished) row on the new owner.
        assert set(published) <= set(once)
        assert len(published) == len(set(published))
        if carried_exact:
            carried = sum(int(m.progress.get("carried_events", 0)) for m in moves)
            assert len(published) == carried, (len(published), carried)

    async def _check_relayed(self, db: ShardedDatabase) -> None:
        """Relays ran and drained: every committed event has a published row, none is
        left unpublished, and no row of an unknown event exists."""
        seen: set[str] = set()
        for name in db.topology.shards:
            async with db.shard(name) as conn:
                for eid, pub in await conn.fetch(
                    "SELECT event_id, published_at FROM tenfold_outbox"
                ):
                    if pub is None:
                        self.unpublished.append((name, str(eid)))
                    seen.add(str(eid))
        assert seen == self.events, (len(seen - self.events), len(self.events - seen))


class RecordingStreams(MemoryStreams):
    """The in-process stream, counting every event id handed to `publish` (repeats too)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def publish(self, spec: TopicSpec, events: list[Event]) -> None:
        for event in events:
            self.calls[event.id] += 1
        await super().publish(spec, events)


class Relays:
    """One outbox relay per shard of `db` (those known now) into one RecordingStreams."""

    def __init__(self, db: ShardedDatabase) -> None:
        self.streams = RecordingStreams()
        self.topics = {t.name: t for t in (MESSAGES, TRANSFERS, USERS)}
        self.relays = [
            OutboxRelay(db, name, self.streams, self.topics, poll_interval_s=0.02, lease_s=2.0)
            for name in db.shard_names
        ]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.streams.start()
        for spec in self.topics.values():
            await self.streams.ensure_topic(spec)
        self._tasks = [asyncio.create_task(r.run()) for r in self.relays]

    async def finish(self) -> None:
        for relay in self.relays:
            relay.stop()
        await asyncio.gather(*self._tasks)
        for relay in self.relays:
            await relay.drain()

    async def check(self, events: set[str]) -> int:
        """Every committed event reached the stream, and the stream holds each once
        (a repeat publish is dropped by event id); return how many were repeated."""
        assert set(self.streams.calls) == events, (
            len(set(self.streams.calls) - events),
            len(events - set(self.streams.calls)),
        )
        stored = 0
        for spec in self.topics.values():
            stored += (await self.streams.topic_status(spec)).messages
        assert stored == len(events), (stored, len(events))
        return sum(n - 1 for n in self.streams.calls.values())


# -- fixtures and helpers ---------------------------------------------------


@pytest.fixture
def new_shard_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """`new_shard_url()` → the URL of an empty database for a shard added at runtime."""
    made: list[str] = []
    admin = request.getfixturevalue("pg_admin_url") if backend == "postgres" else ""

    def make() -> str:
        if backend == "sqlite":
            made.append("x")
            return f"sqlite:///{tmp_path}/added{len(made)}.db"
        name = services.unique_name("tfadd")
        made.append(name)
        return services.database_url(admin, name)

    yield make
    if backend == "postgres" and made:
        from tests.conftest import _run

        _run(services.drop_databases(admin, made))


async def _arena_db(make_db: Any, **overrides: Any) -> ShardedDatabase:
    db: ShardedDatabase = await make_db(shards=2, migrations_dir=str(ARENA), **overrides)
    return db


def _trace(move: MoveRecord, phase: str, done: int, total: int | None) -> None:
    if os.environ.get("TENFOLD_TEST_TRACE"):
        print(f"{time.monotonic():.2f} {move.id} {move.state} {phase} {done}/{total}", flush=True)


def _opts(**kw: Any) -> MoveOptions:
    base: dict[str, Any] = {
        "batch_rows": 200,
        "duty": 0.5,
        "lag_rows": 50,
        "lease_s": 2.0,
        "complete_after_s": 0.0,
    }
    base.update(kw)
    return MoveOptions(**base)


async def _run_with_load(load: Load, work: Awaitable[Any]) -> Any:
    load.start()
    try:
        await asyncio.sleep(0.3)
        result = await work
        await asyncio.sleep(0.3)
    finally:
        await load.finish()
    return result


# -- 1. a move under arena load ------------------------------------------------


async def test_move_under_arena_load_loses_nothing(make_db: Any, new_shard_url: Any) -> None:
    db = await _arena_db(make_db)
    await db.add_shard("s2", new_shard_url())
    slots = "1920-2175"  # 256 slots, half of each old shard's
    load = Load(db, set(parse_slots(slots)), logins=True)
    await load.seed(users=150, rooms=20, messages=400)
    relays = Relays(db)  # s0, s1 and s2, publishing while the move runs
    await relays.start()
    t0 = time.monotonic()
    try:
        moves = await _run_with_load(load, Mover(db, _opts()).move(slots, "s2", until="completed"))
    finally:
        await relays.finish()
    took = time.monotonic() - t0
    assert sorted(m.source for m in moves) == ["s0", "s1"]
    assert all(m.state == "completed" for m in moves), moves
    assert all(db.topology.shard_of_slot(s) == "s2" for s in load.moving)
    assert load.stats["commits"] > 200, load.stats
    assert load.stats["logins"] > 20, load.stats
    await load.check(moves, relayed=True)
    repeats = await relays.check(load.events)
    # Nothing is left unpublished: a carried event the old owner's relay had
    # already published settles on the new owner too (the stream's duplicate).
    stuck = [(shard, eid, relays.streams.calls[eid]) for shard, eid in load.unpublished]
    assert stuck == []
    print(
        f"move took {took:.1f}s; pauses {[m.progress['pause_ms'] for m in moves]} ms; "
        f"stats {dict(load.stats)} errors {load.errors} repeated publishes {repeats}, "
        f"left unpublished {len(stuck)}"
    )


# -- 2. a stale writer through the switch ---------------------------------------


async def test_stale_writer_never_commits_on_the_old_owner(
    make_db: Any, new_shard_url: Any
) -> None:
    db = await _arena_db(make_db)
    await db.add_shard("s2", new_shard_url())
    slots = "0-255"
    moving = set(parse_slots(slots))
    load = Load(db, moving)
    await load.seed()
    stale_settings = db.settings.model_copy(update={"topology_ttl_s": 3600.0})
    stale = await ShardedDatabase(stale_settings).open()
    direct = await ShardedDatabase(stale_settings).open()
    try:
        # The stale process writes users into the moving slots with transaction_for;
        # its bookkeeping is the load's, so the final check covers its rows too.
        writer = Load(stale, moving, seed=11)
        writer.users, writer.balance, writer.keys = load.users, load.balance, load.keys
        writer.events = load.events
        switched = asyncio.Event()
        after_switch = 0

        async def stale_writes() -> None:
            nonlocal after_switch
            while not (switched.is_set() and after_switch >= 20):
                await writer.register(writer._key("stale", moving=True), 0)
                if switched.is_set():
                    after_switch += 1
                await asyncio.sleep(PAUSE_S)

        async def move() -> list[MoveRecord]:
            done = await Mover(db, _opts(), on_progress=_trace).move(slots, "s2", until="switched")
            switched.set()
            return done

        load.start()
        try:
            moves, _ = await asyncio.gather(move(), stale_writes())
        finally:
            await load.finish()
        [rec] = moves
        assert rec.state == "switched"
        # The stale process learnt the new owner only from a refused write (SlotMoved).
        assert stale.topology.epoch == db.topology.epoch
        assert writer.stats["retried"] > 0, writer.stats
        at = float(rec.progress["switched_at"])
        lo, hi = min(moving), max(moving)
        async with db.shard("s0") as conn:
            late = await conn.fetchval(
                "SELECT count(*) FROM arena_users WHERE slot BETWEEN $1 AND $2 AND created_at > $3",
                lo,
                hi,
                at,
            )
            on_source = {
                int(r[0])
                for r in await conn.fetch(
                    "SELECT id FROM arena_users WHERE slot BETWEEN $1 AND $2", lo, hi
                )
            }
        async with db.shard("s2") as conn:
            on_target = {int(r[0]) for r in await conn.fetch("SELECT id FROM arena_users")}
            stale_after = await conn.fetchval(
                "SELECT count(*) FROM arena_users WHERE username LIKE 'stale%' AND created_at > $1",
                at,
            )
        assert late == 0, f"{late} rows committed on the old owner after the switch"
        assert on_source <= on_target
        assert stale_after >= 10, stale_after
        # Without transaction_for: the stale direct write is refused and commits nothing.
        assert direct.topology.epoch < db.topology.epoch
        name = load._key("direct", moving=True)
        uid = direct.new_id(name)
        row = {"id": uid, "username": name, "password_hash": "x", "created_at": time.time()}
        with pytest.raises(SlotMoved):
            async with direct.shard_for(name) as conn, conn.transaction():
                await conn.insert("arena_users", row)
        for shard in ("s0", "s2"):
            async with db.shard(shard) as conn:
                assert (
                    await conn.fetchval("SELECT count(*) FROM arena_users WHERE id = $1", uid) == 0
                )
        # The refusal made it re-read the topology: the same write now lands on s2.
        async with direct.shard_for(name) as conn, conn.transaction():
            await conn.insert("arena_users", row)
        assert direct.topology.epoch == db.topology.epoch
        async with db.shard("s2") as conn:
            assert await conn.fetchval("SELECT count(*) FROM arena_users WHERE id = $1", uid) == 1
        load.keys["arena_users"].add(uid)
        await load.check(moves, completed=False)
        done = await Mover(db, _opts()).complete(rec.id)
        assert done.state == "completed"
        await load.check([done])
    finally:
        await stale.close()
        await direct.close()


# -- 3. the mover killed with SIGKILL in each phase -------------------------------


def _settings_json(settings: Settings) -> dict[str, Any]:
    return {
        "catalog_url": str(settings.catalog_url),
        "shards": [{"name": s.name, "url": str(s.url)} for s in settings.shards],
        "migrations_dir": str(ARENA),
        "connect_timeout_s": 2.0,
        "pool_max_size": 8,
    }


async def _state_of(db: ShardedDatabase) -> list[tuple[str, str]]:
    return [(m.id, m.state) for m in await Mover(db).moves()]


@asynccontextmanager
async def _worker(config: dict[str, Any], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.reshard_worker",
            json.dumps(config),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=err,
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _resume(mover: Mover, move_id: str, within_s: float = 30.0) -> MoveRecord:
    """Run the move to completion once the dead mover's lease lapsed."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await mover.run(move_id, until="completed")
        except (MoveConflict, DataError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


KILL_PHASES = [
    "copying",
    "fencing",
    pytest.param("catching_up", marks=pytest.mark.slow),
    pytest.param("verifying", marks=pytest.mark.slow),
    pytest.param("carried", marks=pytest.mark.slow),
    pytest.param("completing", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("phase", KILL_PHASES)
async def test_mover_killed_in_a_phase_resumes_with_nothing_lost(
    phase: str, make_db: Any, new_shard_url: Any, tmp_path: Path
) -> None:
    db = await _arena_db(make_db)
    await db.add_shard("s2", new_shard_url())
    slots = "0-255"
    load = Load(db, set(parse_slots(slots)))
    await load.seed()
    options = {"batch_rows": 100, "duty": 0.5, "lag_rows": 50, "lease_s": 2.0}
    config = {
        "settings": _settings_json(db.settings),
        "slots": slots,
        "to": "s2",
        "until": "completed",
        "options": {**options, "complete_after_s": 0.0},
        "hang_in": phase,
    }
    load.start()
    try:
        async with _worker(config, tmp_path / "worker.log") as proc:
            assert proc.stdout is not None
            line = b""
            async with asyncio.timeout(60):
                while not line.startswith(b"HANG"):
                    line = await proc.stdout.readline()
                    assert line, (tmp_path / "worker.log").read_text()[-3000:]
            assert line.decode().split() == ["HANG", phase]
            [(move_id, state)] = await _state_of(db)
            assert state == ("fencing" if phase == "carried" else phase)
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
        await asyncio.sleep(0.5)  # writers run against the dead mover's leftovers
        mover = Mover(db, _opts(**options))
        with pytest.raises(MoveConflict):  # its lease has not lapsed yet
            await mover.run(move_id, until="completed")
        rec = await _resume(mover, move_id)
        await asyncio.sleep(0.3)
    finally:
        await load.finish()
    assert rec.state == "completed", rec
    assert all(db.topology.shard_of_slot(s) == "s2" for s in load.moving)
    if phase in ("fencing", "carried"):  # writes to the moving slots were refused, then ran on s2
        assert load.stats["retried"] > 0, load.stats
    # A mover killed after the carry but before the switch's catalog write took its
    # count of carried events with it (the resume carries none): the rows still add up.
    await load.check([rec], carried_exact=phase != "carried")


# -- 4. the source shard dies mid-copy ----------------------------------------------


async def _set_connections(admin: str, database: str, allowed: bool) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(
            f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"true" if allowed else "false"}'
        )
        if not allowed:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                database,
            )
    finally:
        await conn.close()


class _SqliteOutage:
    """A SQLite shard "dies": its pool closes and its file becomes a directory, so
    every new connection fails ("unable to open database file"), root or not."""

    def __init__(self, db: Any, shard: str) -> None:
        self.db = db
        self.shard = shard
        self.path = Path(str(db.pool(shard).url).split("sqlite:///", 1)[1])
        self.moved: list[tuple[Path, Path]] = []

    async def kill(self) -> None:
        await self.db.pool(self.shard).close()
        for path in (
            self.path,
            *(self.path.with_name(self.path.name + x) for x in ("-wal", "-shm")),
        ):
            if path.exists():
                away = path.with_name(path.name + ".away")
                path.rename(away)
                self.moved.append((away, path))
        self.path.mkdir()

    async def restore(self) -> None:
        self.path.rmdir()
        for away, path in self.moved:
            away.rename(path)


async def test_source_dying_mid_copy_stops_the_move_with_its_error_then_resumes(
    backend: str, make_db: Any, new_shard_url: Any, request: pytest.FixtureRequest
) -> None:
    db = await _arena_db(make_db)
    await db.add_shard("s2", new_shard_url())
    slots = "0-255"
    load = Load(db, set(parse_slots(slots)))
    await load.seed()
    if backend == "postgres":
        admin = request.getfixturevalue("pg_admin_url")
        source_db = str(db.pool("s0").url).rsplit("/", 1)[1]

        async def kill() -> None:
            await _set_connections(admin, source_db, False)

        async def restore() -> None:
            await _set_connections(admin, source_db, True)
    else:
        outage = _SqliteOutage(db, "s0")
        kill, restore = outage.kill, outage.restore
    copied = asyncio.Event()

    def progress(move: MoveRecord, phase: str, done: int, total: int | None) -> None:
        if phase == "copy" and done >= 40:
            copied.set()

    # A slow copy (100 rows/s) so the source dies in the middle of it.
    mover = Mover(db, _opts(batch_rows=20, max_rows_s=100.0), on_progress=progress)
    [move] = await mover.start(slots, "s2")
    load.start()
    try:
        run = asyncio.create_task(mover.run(move.id, until="completed"))
        async with asyncio.timeout(30):
            await copied.wait()
        await kill()
        try:
            with pytest.raises(DataError) as raised:
                async with asyncio.timeout(30):
                    await run
            [stored] = await mover.moves()
            assert stored.state == "copying", stored
            assert 0 < int(stored.progress["copied_rows"]) < int(stored.progress["total_rows"])
            # The stored error names its type (a DataError), the shard and the cause.
            assert stored.error is not None
            kind = stored.error.split(":", 1)[0]
            assert kind == type(raised.value).__name__, stored.error
            assert "s0" in stored.error, stored.error
            print(f"stored error: {stored.error}")
            await asyncio.sleep(0.5)  # writers keep failing on s0, the others go on
        finally:
            await restore()
        rec = await _resume(mover, move.id)
        await asyncio.sleep(0.3)
    finally:
        await load.finish()
    assert rec.state == "completed", rec
    assert rec.error is None
    assert any(k.startswith("error ") for k in load.stats), load.stats  # the outage was seen
    await load.check([rec])


# -- 5. concurrent moves of disjoint ranges ----------------------------------------


@pytest.mark.parametrize(
    "shared",
    [
        False,
        True,
    ],
    ids=["apart", "sharing-s0"],
)
async def test_concurrent_moves_of_disjoint_ranges_both_complete(
    shared: bool, backend: str, make_db: Any, new_shard_url: Any, request: pytest.FixtureRequest
) -> None:
    """Two `move` calls at once to two targets. apart: s0 -> s2 and s1 -> s3 share no
    shard. sharing-s0: s0 -> s2 and s1 -> s0, so s0 is a source of one and the target
    of the other (on PostgreSQL their trigger rewrites take turns under one lock)."""
    db = await _arena_db(make_db)
    await db.add_shard("s2", new_shard_url())
    second_target = "s0" if shared else "s3"
    if not shared:
        await db.add_shard("s3", new_shard_url())
    a, b = "0-255", "2048-2303"
    load = Load(db, set(parse_slots(a)) | set(parse_slots(b)))
    await load.seed()
    mover = Mover(db, _opts())
    first, second = await _run_with_load(
        load,
        asyncio.gather(
            mover.move(a, "s2", until="completed"),
            mover.move(b, second_target, until="completed"),
        ),
    )
    moves = [*first, *second]
    assert [(m.source, m.target, m.state) for m in moves] == [
        ("s0", "s2", "completed"),
        ("s1", second_target, "completed"),
    ]
    topo = db.topology
    assert {topo.shard_of_slot(s) for s in parse_slots(a)} == {"s2"}
    assert {topo.shard_of_slot(s) for s in parse_slots(b)} == {second_target}
    assert topo.shard_of_slot(256) == "s0" and topo.shard_of_slot(2304) == "s1"
    await load.check(moves)


# -- core problems found here, each fixed: kept as regression tests --------------


@pytest.mark.slow
async def test_verify_ends_under_a_steady_write_stream(
    backend: str, make_db: Any, new_shard_url: Any, request: pytest.FixtureRequest
) -> None:
    """Writers with a 1 ms pause (several hundred logged changes a second on PostgreSQL):
    the move must still reach its switch."""
    db = await _arena_db(make_db)
    await db.add_shard("s2", new_shard_url())
    load = Load(db, set(range(256)))
    await load.seed()
    load.start(pause_s=0.001)
    mover = Mover(db, _opts())
    try:
        async with asyncio.timeout(25):
            [rec] = await mover.move("0-255", "s2")
    except TimeoutError:
        [rec] = await mover.moves()
        raise AssertionError(f"after 25 s the move is still {rec.state}") from None
    finally:
        await load.finish()
    assert rec.state == "switched"


async def test_outbox_event_of_an_unmoved_room_is_refused_after_a_move(
    make_db: Any, new_shard_url: Any
) -> None:
    db = await _arena_db(make_db, slot_moved_wait_s=0.5)
    await db.add_shard("s2", new_shard_url())
    n = 0
    while True:  # a room outside 0-255 whose event key hashes into 0-255
        n += 1
        rid = db.new_id(f"room{n}")
        if 256 <= slot_of_id(rid) < 2048 and slot_of(f"room:{rid}") < 256:
            break
    await Mover(db, _opts()).move("0-255", "s2", until="completed")
    assert db.topology.shard_of_slot(slot_of_id(rid)) == "s0"  # the room did not move
    row = {
        "id": db.new_id_beside(rid),
        "room_id": rid,
        "author_id": 1,
        "author": "a",
        "body": "hi",
        "idem_key": None,
        "created_at": time.time(),
    }
    event = outbox_row(MESSAGES, f"room:{rid}", {"id": row["id"]})

    async def send(conn: Connection) -> None:
        await conn.insert_together(
            [Insert("arena_messages", row), Insert("tenfold_outbox", event, sharded=False)]
        )

    await db.transaction_for_id(rid, send)


async def test_carried_event_already_published_by_the_old_relay_is_marked_on_the_new_owner(
    make_db: Any, new_shard_url: Any
) -> None:
    db = await _arena_db(make_db)
    await db.add_shard("s2", new_shard_url())
    load = Load(db, set(range(256)))
    name = load._key("user", moving=True)
    await load.register(name, 5)
    [event_id] = load.events
    streams = RecordingStreams()
    await streams.start()
    await streams.ensure_topic(USERS)
    # The old owner's relay read the row and published it; the carry at the switch
    # then marks it on s0 before that relay did.
    async with db.shard("s0") as conn:
        row = await conn.fetchrow(f"{OUTBOX_ROW} WHERE event_id = $1", event_id)
    assert row is not None
    await streams.publish(USERS, [event_of_row(row)])
    [move] = await Mover(db, _opts()).move("0-255", "s2", until="completed")
    assert move.progress["carried_events"] == 1
    relay = OutboxRelay(db, "s2", streams, {USERS.name: USERS}, poll_interval_s=0.02)
    await relay.drain(timeout_s=2.0)
    await asyncio.sleep(0.2)
    await relay.mark_settled()
    assert streams.calls[event_id] == 2  # the new owner's relay published it again
    assert (await streams.topic_status(USERS)).messages == 1  # the stream kept one
    async with db.shard("s2") as conn:
        published_at = await conn.fetchval(
            "SELECT published_at FROM tenfold_outbox WHERE event_id = $1", event_id
        )
    assert published_at is not None
