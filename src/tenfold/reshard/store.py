"""The catalog's records of moves: create (claiming slots), load, update, switch.

A move's slots are claimed in `tenfold_move_slots` in the transaction that
creates it: the primary key makes a second unfinished move of any of them fail,
so two workflows never hold one slot. The switch stores the new topology and
the move's new state in one catalog transaction: a mover that dies either
switched or did not, never half.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tenfold.data.catalog import Catalog
from tenfold.errors import ConstraintViolation, MoveConflict, ReshardError, StaleEpoch
from tenfold.keyspace import Topology
from tenfold.reshard.slots import format_ranges, to_ranges

__all__ = ["FINISHED", "MoveRecord", "MoveStore"]

FINISHED = ("completed", "cancelled", "reversed")


@dataclass
class MoveRecord:
    """One move workflow as the catalog holds it."""

    id: str
    source: str
    target: str
    slots: list[int]
    state: str
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    owner: str | None = None
    heartbeat_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return to_ranges(self.slots)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "target": self.target,
            "slots": format_ranges(self.slots),
            "slot_count": len(self.slots),
            "state": self.state,
            "error": self.error,
            "progress": self.progress,
            "owner": self.owner,
            "heartbeat_at": self.heartbeat_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


_COLS = (
    "id, source, target, slots, state, progress, error, owner, heartbeat_at, created_at, updated_at"
)


def _record(r: Any) -> MoveRecord:
    return MoveRecord(
        r[0],
        r[1],
        r[2],
        orjson.loads(r[3]),
        r[4],
        orjson.loads(r[5]),
        r[6],
        r[7],
        r[8],
        r[9],
        r[10],
    )


def held_elsewhere(holders: dict[str, list[int]]) -> MoveConflict:
    """The refusal of slots that unfinished moves hold, naming each move."""
    return MoveConflict(
        "slots already being moved: "
        + "; ".join(f"{format_ranges(s)} by {m}" for m, s in holders.items())
        + ": finish, cancel or reverse that move first (`tenfold shards moves`)"
    )


def _owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class MoveStore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.pool = catalog.pool
        self.me = _owner_name()

    async def create(self, source: str, target: str, slots: Sequence[int]) -> MoveRecord:
        """Record a new move and claim its slots, or change nothing.

        Raises:
            MoveConflict: an unfinished move holds some of the slots (named).
        """
        now = time.time()
        move = MoveRecord(
            f"mv-{uuid.uuid4().hex[:10]}",
            source,
            target,
            sorted(slots),
            "created",
            {},
            None,
            None,
            None,
            now,
            now,
        )
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "INSERT INTO tenfold_move_slots (slot, move_id) VALUES ($1, $2)",
                    [(s, move.id) for s in move.slots],
                )
                await conn.execute(
                    f"INSERT INTO tenfold_moves ({_COLS}) VALUES "
                    "($1, $2, $3, $4, $5, $6, NULL, NULL, NULL, $7, $7)",
                    move.id,
                    source,
                    target,
                    orjson.dumps(move.slots).decode(),
                    move.state,
                    "{}",
                    now,
                )
        except ConstraintViolation:
            raise held_elsewhere(await self.holders(slots)) from None
        return move

    async def holders(self, slots: Sequence[int]) -> dict[str, list[int]]:
        wanted = set(slots)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT slot, move_id FROM tenfold_move_slots")
        out: dict[str, list[int]] = {}
        for r in rows:
            if int(r[0]) in wanted:
                out.setdefault(str(r[1]), []).append(int(r[0]))
        return out

    async def get(self, move_id: str) -> MoveRecord:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT {_COLS} FROM tenfold_moves WHERE id = $1", move_id)
        if row is None:
            raise ReshardError(f"no move {move_id!r}: `tenfold shards moves` lists them")
        return _record(row)

    async def all(self) -> list[MoveRecord]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_COLS} FROM tenfold_moves ORDER BY created_at")
        return [_record(r) for r in rows]

    async def save(self, move: MoveRecord, *, error: str | None = None) -> None:
        move.updated_at = time.time()
        move.error = error
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE tenfold_moves SET state = $1, progress = $2, error = $3, updated_at = $4 "
                "WHERE id = $5",
                move.state,
                orjson.dumps(move.progress).decode(),
                error,
                move.updated_at,
                move.id,
            )

    async def take(self, move: MoveRecord, lease_s: float) -> None:
        """Become the one process running `move`, or raise if a live one already is."""
        now = time.time()
        async with self.pool.acquire() as conn:
            n = await conn.execute(
                "UPDATE tenfold_moves SET owner = $1, heartbeat_at = $2 WHERE id = $3 AND "
                "(owner IS NULL OR owner = $1 OR heartbeat_at < $4)",
                self.me,
                now,
                move.id,
                now - lease_s,
            )
        if n != 1:
            fresh = await self.get(move.id)
            ago = now - (fresh.heartbeat_at or now)
            raise MoveConflict(
                f"move {move.id} is being run by {fresh.owner} (heartbeat {ago:.1f} s ago); "
                f"wait for it, or resume once its lease of {lease_s:.0f} s lapsed"
            )

    async def heartbeat(self, move: MoveRecord) -> bool:
        async with self.pool.acquire() as conn:
            n = await conn.execute(
                "UPDATE tenfold_moves SET heartbeat_at = $1 WHERE id = $2 AND owner = $3",
                time.time(),
                move.id,
                self.me,
            )
        return n == 1

    async def let_go(self, move: MoveRecord) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE tenfold_moves SET owner = NULL WHERE id = $1 AND owner = $2",
                move.id,
                self.me,
            )

    async def release(self, move: MoveRecord) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM tenfold_move_slots WHERE move_id = $1", move.id)

    async def switch(self, move: MoveRecord, to: str, state: str) -> int:
        """Store a topology where the move's slots belong to `to`, and the move's
        new `state`, in one catalog transaction; return the new epoch.

        Concurrent switches of other moves make this retry on the newer topology.
        """
        for _ in range(50):
            current = await self.catalog.load_topology()
            assert current is not None
            if all(current.shard_of_slot(s) == to for s in move.slots):
                fresh = current  # already switched: only the state is left to store
            else:
                fresh = current.with_slots_moved(move.slots, to)
            move.state = state
            move.updated_at = time.time()
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    if fresh is not current:
                        await conn.execute(
                            "INSERT INTO tenfold_topology (epoch, body, created_at) "
                            "VALUES ($1, $2, $3)",
                            fresh.epoch,
                            orjson.dumps(fresh.to_dict()).decode(),
                            time.time(),
                        )
                    mine = await conn.execute(
                        "UPDATE tenfold_moves SET state = $1, progress = $2, error = NULL, "
                        "updated_at = $3 WHERE id = $4 AND owner = $5",
                        state,
                        orjson.dumps(move.progress).decode(),
                        move.updated_at,
                        move.id,
                        self.me,
                    )
                    if mine != 1:  # rolls the topology row back with it
                        raise MoveConflict(
                            f"move {move.id} was taken over by another mover; this one "
                            "did not switch it"
                        )
            except ConstraintViolation:
                continue  # another move switched first: derive from its topology
            return fresh.epoch
        raise StaleEpoch(0, await self.catalog.current_epoch())

    # -- shards added after deployment ------------------------------------

    async def register_shard(self, name: str, url: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO tenfold_shards (name, url, added_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET url = excluded.url",
                name,
                url,
                time.time(),
            )

    async def add_to_topology(self, name: str) -> Topology:
        """A topology one epoch on that lists `name` (owning no slots yet)."""
        for _ in range(50):
            current = await self.catalog.load_topology()
            assert current is not None
            if name in current.shards:
                return current
            fresh = Topology(current.epoch + 1, current.ranges, (*current.shards, name))
            try:
                await self.catalog.save_topology(fresh)
            except StaleEpoch:
                continue
            return fresh
        raise StaleEpoch(0, await self.catalog.current_epoch())
