"""The shard side of a move: slot states, the write fence, and the change log.

Each shard keeps a `tenfold_slot_state` row for the slots a move involves
(migrations/shard/0001_slot_state.*.sql). A trigger on every slot table reads
it inside the writing transaction:

    no row      owned here: the write proceeds, nothing else happens
    'capture'   owned here, moving out: the write proceeds and its primary
                key is logged to tenfold_reshard_log (same transaction)
    'fenced'    not owned here: the write is refused (SlotMoved), so a process
                routing by an old topology can never commit to the old owner
    'apply'     the mover's own writes on SQLite: it flips its slots' rows to
                'apply' inside its transaction and back before commit, so no
                other transaction ever sees it (PostgreSQL: SET LOCAL instead)

Why triggers and not logical decoding on PostgreSQL: logical decoding needs
`wal_level = logical` (a server restart; off by default and on many managed
services), a replication slot whose WAL retention can fill the source's disk
if the mover dies, and a binary protocol asyncpg does not speak; the fence has
to be a trigger anyway. The log keeps keys, not row images: catch-up re-reads
each logged key's current row, which makes every apply idempotent and lets the
log be drained in any order (docs/resharding.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from tenfold.data import migrations
from tenfold.data.base import Connection, Pool, check_identifier
from tenfold.errors import ShardTimeout
from tenfold.reshard.slots import to_ranges
from tenfold.reshard.tables import OUTBOX, SlotTable
from tenfold.resilience import Backoff

__all__ = ["CAPTURE", "FENCED", "ShardSide"]

CAPTURE, FENCED, APPLY = "capture", "fenced", "apply"
_INSTALL_LOCK = 0x7E4F0E5  # advisory lock of slot-trigger rewrites on one shard
_MIGRATIONS = migrations.discover(
    migrations.BUILTIN_DIR.parent.parent / "reshard" / "migrations", "shard", "tenfold.reshard"
)


class ShardSide:
    """Resharding's operations on one shard database."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.name = pool.name
        self.sqlite = pool.dialect == "sqlite"
        self._held = False

    async def install(self, tables: Sequence[SlotTable], cover: Sequence[int] = ()) -> None:
        """Create the state and log tables, and the slot triggers (idempotent).

        On PostgreSQL the triggers carry a `WHEN` that lists the slots this
        shard keeps a state for, plus `cover`: rows of every other slot never
        enter PL/pgSQL (the check runs in the executor), so a shard pays for
        the fence only on the slots that moved. Changing a trigger takes a brief
        table lock, so this runs when a move starts and ends, never at the
        switch, with a short lock timeout, retried, so it never queues writers.
        Every rewrite happens under one advisory lock per shard, and states are
        added under it too (`cover`): concurrent moves sharing a shard cannot
        write a `WHEN` that misses the other's slots. SQLite's triggers test the
        state table in their `WHEN`: nothing to keep in step.
        """
        await migrations.apply(self.pool, _MIGRATIONS)
        if self.sqlite:
            async with self.pool.acquire() as conn, conn.transaction():
                for table in tables:
                    await self._sqlite_trigger(
                        conn, table.name, table.pk, ("INSERT", "UPDATE", "DELETE")
                    )
                # The outbox is not fenced: an event's slot is its key's, which
                # need not be the slot of the rows its transaction wrote.
                await conn.execute(f"DROP TRIGGER IF EXISTS tenfold_slot_{OUTBOX}_i")
            return
        async with self._locked(), self.pool.acquire() as conn:
            stated = {int(r[0]) for r in await conn.fetch("SELECT slot FROM tenfold_slot_state")}
        async with self._locked():
            ranges = to_ranges(stated | set(cover))
            for table in tables:
                await self._pg_triggers(table.name, table.pk, ranges)
            await self._pg_triggers(OUTBOX, (), [])  # drops a fence older versions put there

    async def cover(
        self, tables: Sequence[SlotTable], slots: Sequence[int], state: str, move_id: str
    ) -> None:
        """Give `slots` the state `state`, the triggers covering them first."""
        async with self._locked():
            await self.install(tables, cover=slots)
            await self.set_state(slots, state, move_id)

    async def uncover(
        self, tables: Sequence[SlotTable], slots: Sequence[int], move_id: str
    ) -> None:
        """Drop `slots`' states (owned, as usual), then shrink the triggers."""
        async with self._locked():
            await self.set_state(slots, None, move_id)
            await self.install(tables)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """PostgreSQL's session advisory lock of this shard's trigger rewrites (re-entrant)."""
        if self.sqlite or self._held:
            yield
            return
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _INSTALL_LOCK)
            self._held = True
            try:
                yield
            finally:
                self._held = False
                await conn.execute("SELECT pg_advisory_unlock($1)", _INSTALL_LOCK)

    async def _pg_triggers(
        self, table: str, pk: Sequence[str], ranges: Sequence[tuple[int, int]]
    ) -> None:
        check_identifier(table, self.name)
        args = ", ".join(f"'{check_identifier(c, self.name)}'" for c in pk)

        def when(row: str) -> str:
            # The mover's own transactions (SET LOCAL tenfold.apply) skip the
            # trigger in the executor: a bulk copy never enters PL/pgSQL per row.
            slots = " OR ".join(
                f"{row}.slot = {a}" if a == b else f"{row}.slot BETWEEN {a} AND {b}"
                for a, b in ranges
            )
            return f"({slots}) AND coalesce(current_setting('tenfold.apply', true), '') = ''"

        statements = []
        if ranges:
            statements.append(
                f"CREATE OR REPLACE TRIGGER tenfold_slot_w BEFORE INSERT OR UPDATE ON {table} "
                f"FOR EACH ROW WHEN ({when('NEW')}) EXECUTE FUNCTION tenfold_slot_trigger({args})"
            )
            statements.append(
                f"CREATE OR REPLACE TRIGGER tenfold_slot_d BEFORE DELETE ON {table} "
                f"FOR EACH ROW WHEN ({when('OLD')}) "
                f"EXECUTE FUNCTION tenfold_slot_trigger({args})"
            )
        else:
            statements.append(f"DROP TRIGGER IF EXISTS tenfold_slot_w ON {table}")
            statements.append(f"DROP TRIGGER IF EXISTS tenfold_slot_d ON {table}")
        backoff = Backoff(initial_s=0.01, max_s=0.5)
        deadline = time.monotonic() + 30.0
        while True:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    await conn.execute("SET LOCAL lock_timeout = '200ms'")
                    for sql in statements:
                        await conn.execute(sql)
                return
            except ShardTimeout:
                # A long transaction holds the table: give way (writers must not
                # queue behind this lock), then try again.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(backoff.next_s())

    async def _sqlite_trigger(
        self, conn: Connection, table: str, pk: Sequence[str], ops: Sequence[str]
    ) -> None:
        check_identifier(table, self.name)
        for col in pk:
            check_identifier(col, self.name)
        for op in ops:
            row = "OLD" if op == "DELETE" else "NEW"
            log = ""
            # An UPDATE logs the old key too: a changed primary key must not
            # leave the old row behind on the target.
            for image in (("OLD", "NEW") if op == "UPDATE" else (row,)) if pk else ():
                key = ", ".join(f"{image}.{c}" for c in pk)
                log += (
                    "INSERT INTO tenfold_reshard_log (move_id, tbl, slot, pk) "
                    f"SELECT move_id, '{table}', {row}.slot, json_array({key}) "
                    f"FROM tenfold_slot_state WHERE slot = {row}.slot AND state = '{CAPTURE}';"
                )
            await conn.execute(
                f"CREATE TRIGGER IF NOT EXISTS tenfold_slot_{table}_{op[0].lower()} "
                f"BEFORE {op} ON {table} WHEN EXISTS (SELECT 1 FROM tenfold_slot_state "
                f"WHERE slot = {row}.slot AND state <> '{APPLY}') BEGIN "
                f"SELECT RAISE(ABORT, 'tenfold_slot_moved') FROM tenfold_slot_state "
                f"WHERE slot = {row}.slot AND state = '{FENCED}'; {log} END"
            )

    async def set_state(self, slots: Sequence[int], state: str | None, move_id: str) -> None:
        """Give `slots` the state `state` (None: delete their rows: owned, as usual)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self.set_state_in(conn, slots, state, move_id)

    async def set_state_in(
        self, conn: Connection, slots: Sequence[int], state: str | None, move_id: str
    ) -> None:
        if state is None:
            await conn.executemany(
                "DELETE FROM tenfold_slot_state WHERE slot = $1", [(s,) for s in slots]
            )
            return
        await conn.executemany(
            "INSERT INTO tenfold_slot_state (slot, state, move_id) VALUES ($1, $2, $3) "
            "ON CONFLICT (slot) DO UPDATE SET state = excluded.state, move_id = excluded.move_id",
            [(s, state, move_id) for s in slots],
        )

    async def states(self, move_id: str) -> dict[int, str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT slot, state FROM tenfold_slot_state WHERE move_id = $1", move_id
            )
        return {int(r[0]): str(r[1]) for r in rows}

    @contextlib.asynccontextmanager
    async def applying(self, move_id: str) -> AsyncIterator[Connection]:
        """A transaction in which the mover may write this move's fenced slots.

        PostgreSQL: `SET LOCAL tenfold.apply` names the move for this
        transaction only; the trigger lets it through. SQLite (one writer at a
        time): the slots' rows flip to 'apply' and back inside the transaction,
        so no other transaction ever sees the flip. Either way a stale writer
        is refused even while the mover writes.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            if not self.sqlite:
                await conn.execute("SELECT set_config('tenfold.apply', $1, true)", move_id)
                yield conn
                return
            await conn.execute(
                "UPDATE tenfold_slot_state SET state = $1 WHERE move_id = $2 AND state = $3",
                APPLY,
                move_id,
                FENCED,
            )
            yield conn
            await conn.execute(
                "UPDATE tenfold_slot_state SET state = $1 WHERE move_id = $2 AND state = $3",
                FENCED,
                move_id,
                APPLY,
            )

    async def wait_in_flight(self, timeout_s: float) -> None:
        """Wait until every transaction open when this was called has ended.

        A state change commits before this is called; a writer whose trigger
        read the old state is still inside its transaction, and must finish
        (its change then is in the log or refused) before the move goes on.
        SQLite has one writer at a time, so none can be in flight.

        Raises:
            ShardTimeout: a transaction stayed open past `timeout_s` (an idle
                session inside BEGIN, a long report); the move can resume later.
        """
        if self.sqlite:
            return
        deadline = time.monotonic() + timeout_s
        async with self.pool.acquire() as conn:
            since = await conn.fetchval("SELECT clock_timestamp()")
            while True:
                open_ = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
                    "AND state <> 'idle' AND xact_start < $1",
                    since,
                )
                if not open_:
                    return
                if time.monotonic() > deadline:
                    raise ShardTimeout(
                        self.name,
                        timeout_s,
                        f"waiting for {open_} transaction(s) open since before the slot "
                        "state changed (an idle-in-transaction session?)",
                    )
                await asyncio.sleep(0.002)

    async def pending(self, move_id: str) -> int:
        async with self.pool.acquire() as conn:
            n = await conn.fetchval(
                "SELECT count(*) FROM tenfold_reshard_log WHERE move_id = $1", move_id
            )
        return int(n or 0)

    async def read_log(self, move_id: str, limit: int) -> list[tuple[int, str, int, list[Any]]]:
        """Up to `limit` logged changes: (log id, table, slot, primary key values)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, tbl, slot, pk FROM tenfold_reshard_log WHERE move_id = $1 "
                "ORDER BY id LIMIT $2",
                move_id,
                limit,
            )
        return [(int(r[0]), str(r[1]), int(r[2]), orjson.loads(r[3])) for r in rows]

    async def delete_log(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        async with self.pool.acquire() as conn:
            await conn.executemany(
                "DELETE FROM tenfold_reshard_log WHERE id = $1", [(i,) for i in ids]
            )

    async def clear(self, move_id: str) -> None:
        """Drop what a finished move left in the log (in bounded batches)."""
        while True:
            async with self.pool.acquire() as conn:
                n = await conn.execute(
                    "DELETE FROM tenfold_reshard_log WHERE id IN (SELECT id FROM "
                    "tenfold_reshard_log WHERE move_id = $1 LIMIT 5000)",
                    move_id,
                )
            if n == 0:
                return
