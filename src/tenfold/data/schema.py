"""The schema of every database of a `ShardedDatabase`: migrate, report, check conventions.

The slot convention (so a later reshard can move a slot's rows): every app
table on a shard has a `slot` column and an index whose first column is
`slot`. `slot_convention` lists the tables that break it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tenfold.data import migrations
from tenfold.data.base import Pool
from tenfold.errors import TenfoldError

if TYPE_CHECKING:
    from tenfold.data.router import ShardedDatabase

__all__ = ["DatabaseStatus", "migrate_all", "schema_status", "slot_convention"]


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    database: str
    url: str
    applied: int
    pending: list[str]
    changed: list[str]
    convention: list[str]
    error: str | None = None


def _plan(folder: Path | None, target: str) -> list[migrations.Migration]:
    found = migrations.builtin(target)
    if folder is not None:
        found += migrations.discover(Path(folder), target, "app")
    return found


def _targets(
    db: ShardedDatabase, folder: Path | None
) -> list[tuple[Pool, list[migrations.Migration]]]:
    folder = folder if folder is not None else db.settings.migrations_dir
    shard_plan = _plan(folder, "shard")
    return [(db.catalog.pool, _plan(folder, "catalog"))] + [
        (db.pool(name), shard_plan) for name in db.shard_names
    ]


async def migrate_all(
    db: ShardedDatabase,
    folder: Path | None = None,
    *,
    create: bool = True,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, list[str]]:
    """Apply pending migrations to the catalog and every shard, concurrently.

    Args:
        create: create missing databases first (Postgres `CREATE DATABASE`,
            SQLite files).
        on_done: called with each database's name as it finishes (progress bars).
    Raises:
        MigrationError or ShardUnavailable for the first database that fails;
        the others still finish what they were doing.
    """

    async def one(pool: Pool, plan: list[migrations.Migration]) -> list[str]:
        if create:
            await pool.create_database()
        applied = await migrations.apply(pool, plan)
        if on_done is not None:
            on_done(pool.name)
        return applied

    targets = _targets(db, folder)
    results = await asyncio.gather(*(one(p, plan) for p, plan in targets), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return {pool.name: list(r) for (pool, _), r in zip(targets, results, strict=True)}  # type: ignore[arg-type]


async def schema_status(db: ShardedDatabase, folder: Path | None = None) -> list[DatabaseStatus]:
    """Per database: applied and pending migrations, edited ones, convention problems."""

    async def one(pool: Pool, plan: list[migrations.Migration]) -> DatabaseStatus:
        try:
            states = await migrations.state(pool, plan)
            problems = [] if pool is db.catalog.pool else await slot_convention(pool)
        except TenfoldError as exc:
            return DatabaseStatus(pool.name, pool.safe_url, 0, [], [], [], str(exc))
        return DatabaseStatus(
            pool.name,
            pool.safe_url,
            sum(1 for s in states if s.applied_at is not None),
            [s.name for s in states if s.applied_at is None],
            [s.name for s in states if s.changed],
            problems,
        )

    return list(await asyncio.gather(*(one(p, plan) for p, plan in _targets(db, folder))))


async def slot_convention(pool: Pool) -> list[str]:
    """Tables on a shard that lack a `slot` column or an index led by `slot`."""
    async with pool.acquire() as conn:
        if pool.dialect == "sqlite":
            tables = [
                r[0]
                for r in await conn.fetch(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'tenfold_%'"
                )
            ]
            with_slot, indexed = set(), set()
            for t in tables:
                cols = [r[1] for r in await conn.fetch(f"PRAGMA table_info({t})")]
                if "slot" in cols:
                    with_slot.add(t)
                for idx in await conn.fetch(f"PRAGMA index_list({t})"):
                    first = await conn.fetchrow(f"PRAGMA index_info({idx[1]})")
                    if first is not None and first[2] == "slot":
                        indexed.add(t)
        else:
            tables = [
                r[0]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                    "AND tablename NOT LIKE 'tenfold\\_%'"
                )
            ]
            with_slot = {
                r[0]
                for r in await conn.fetch(
                    "SELECT table_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND column_name = 'slot'"
                )
            }
            indexed = {
                r[0]
                for r in await conn.fetch(
                    "SELECT c.relname FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indrelid "
                    "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] "
                    "WHERE a.attname = 'slot'"
                )
            }
    problems = []
    for t in sorted(tables):
        if t not in with_slot:
            problems.append(f"{t}: no slot column")
        elif t not in indexed:
            problems.append(f"{t}: no index starting with slot")
    return problems
