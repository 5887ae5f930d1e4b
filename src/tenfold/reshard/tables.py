"""The tables a slot move carries: every table on a shard with a `slot` column.

A move copies, captures and verifies each by its primary key, so a table with
a `slot` column but no primary key is refused by name before anything moves.
`tenfold_outbox` is not among them: its unpublished rows are carried over at
the switch (`tenfold.reshard.switch`), published ones stay where they were.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenfold.data.base import Pool
from tenfold.errors import MoveRefused

__all__ = ["OUTBOX", "SlotTable", "slot_tables"]

OUTBOX = "tenfold_outbox"
# Resharding's own bookkeeping and tables without rows of a slot.
_SKIP = {OUTBOX, "tenfold_slot_state", "tenfold_reshard_log", "tenfold_migrations"}


@dataclass(frozen=True, slots=True)
class SlotTable:
    """A table's name, its columns in order, its primary key, and (PostgreSQL)
    the type of each key column, for casts of bound key values."""

    name: str
    columns: tuple[str, ...]
    pk: tuple[str, ...]
    pk_types: tuple[str, ...] = ()

    @property
    def order(self) -> tuple[str, ...]:
        """The keyset order of a copy: slot first (the convention's index), then the key."""
        return ("slot", *(c for c in self.pk if c != "slot"))


async def slot_tables(pool: Pool) -> list[SlotTable]:
    """Every table of `pool`'s database with a `slot` column, in name order.

    Raises:
        MoveRefused: a table with a `slot` column has no primary key.
    """
    async with pool.acquire() as conn:
        if pool.dialect == "sqlite":
            names = [
                r[0]
                for r in await conn.fetch(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
            found: list[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = []
            for name in names:
                info = await conn.fetch(f'PRAGMA table_info("{name}")')
                cols = tuple(r[1] for r in info)
                pk = tuple(r[1] for r in sorted((r for r in info if r[5] > 0), key=lambda r: r[5]))
                found.append((name, cols, pk, ()))
        else:
            rows = await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
            )
            cols_of: dict[str, list[str]] = {}
            for r in rows:
                cols_of.setdefault(r[0], []).append(r[1])
            keys = await conn.fetch(
                "SELECT c.relname, a.attname, format_type(a.atttypid, NULL), k.n "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                "JOIN pg_namespace ns ON ns.oid = c.relnamespace "
                "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
                "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum "
                "WHERE i.indisprimary AND ns.nspname = current_schema() ORDER BY c.relname, k.n"
            )
            pk_of: dict[str, list[tuple[str, str]]] = {}
            for r in keys:
                pk_of.setdefault(r[0], []).append((r[1], r[2]))
            found = [
                (
                    name,
                    tuple(cols),
                    tuple(c for c, _ in pk_of.get(name, [])),
                    tuple(t for _, t in pk_of.get(name, [])),
                )
                for name, cols in sorted(cols_of.items())
            ]
    tables = []
    for name, cols, pk, types in found:
        if name in _SKIP or "slot" not in cols:
            continue
        if not pk:
            raise MoveRefused(
                f"table {name} on {pool.name} has a slot column but no primary key: a move "
                "copies and checks rows by key; add a primary key (a migration) first"
            )
        tables.append(SlotTable(name, cols, pk, types))
    return tables
