"""The shard side of a move: slot states, the write fence, and the change log.

Each shard keeps a `tenfold_slot_state` row for the slots a move involves
(migrations/shard/0001_slot_state.*.sql). A trigger on every slot table reads
it inside the writing transaction:

    no row      owned here: the write proceeds, nothing else happens
    'capture'   owned here, moving out: the write proceeds and its primary
                key is logged to tenfold_reshard_log (same transaction)
    'fenced'    not owned here: the write is refused (SlotMoved), so a process
                routing by an old topology can never commit to the old owner
    'apply'     the mover's own writes: it flips its slots' rows to 'apply'
                inside its transaction and back before commit, so no other
                transaction ever sees 'apply'

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
from tenfold.reshard.tables import OUTBOX, SlotTable

__all__ = ["CAPTURE", "FENCED", "ShardSide"]

CAPTURE, FENCED, APPLY = "capture", "fenced", "apply"
_MIGRATIONS = migrations.discover(
    migrations.BUILTIN_DIR.parent.parent / "reshard" / "migrations", "shard", "tenfold.reshard"
)


class ShardSide:
    """Resharding's operations on one shard database."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.name = pool.name
        self.sqlite = pool.dialect == "sqlite"

    async def install(self, tables: Sequence[SlotTable]) -> None:
        """Create the state and log tables and a trigger on every slot table (idempotent).

        Creating a trigger takes a brief table lock on PostgreSQL: this runs
        once per table when a move starts, never at the switch.
        """
        await migrations.apply(self.pool, _MIGRATIONS)
        async with self.pool.acquire() as conn, conn.transaction():
            for table in tables:
                await self._trigger(conn, table.name, table.pk, ("INSERT", "UPDATE", "DELETE"))
            # The outbox is fenced for inserts only: the relay still marks rows
            # published after their slot moved away.
            await self._trigger(conn, OUTBOX, (), ("INSERT",))

    async def _trigger(
        self, conn: Connection, table: str, pk: Sequence[str], ops: Sequence[str]
    ) -> None:
        check_identifier(table, self.name)
        for col in pk:
            check_identifier(col, self.name)
        if not self.sqlite:
            args = ", ".join(f"'{c}'" for c in pk)
            await conn.execute(
                f"CREATE OR REPLACE TRIGGER tenfold_slot_guard BEFORE {' OR '.join(ops)} "
                f"ON {table} FOR EACH ROW EXECUTE FUNCTION tenfold_slot_trigger({args})"
            )
            return
        for op in ops:
            row = "OLD" if op == "DELETE" else "NEW"
            log = ""
            if pk:
                key = ", ".join(f"{row}.{c}" for c in pk)
                log = (
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

        Other transactions keep seeing 'fenced' (the flip is uncommitted until
        it is undone), so a stale writer is refused even while the mover writes.
        """
        async with self.pool.acquire() as conn, conn.transaction():
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
