"""Ordered `.sql` migrations for the catalog and for every shard.

Layout of a migrations folder (tenfold's own ships in the package)::

    <dir>/catalog/0001_topology.sql
    <dir>/shard/0001_messages.sql
    <dir>/shard/0002_index.postgresql.sql   # dialect-specific variant
    <dir>/shard/0002_index.sqlite.sql

Files apply in name order. A file `NAME.<dialect>.sql` replaces `NAME.sql` on
that dialect. Each migration runs in its own transaction together with its row
in `tenfold_migrations`, so it is applied fully or not at all, and once: a
second run skips it. Concurrent migrators are serialised (an advisory lock on
Postgres, the write lock on SQLite) and re-check under the lock. Editing an
applied file is refused with the name of the file and the database.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from tenfold.data.base import Pool
from tenfold.errors import DataError, MigrationError

__all__ = ["BUILTIN", "BUILTIN_DIR", "Migration", "MigrationState", "apply", "discover", "state"]

BUILTIN_DIR = Path(__file__).parent / "migrations"
# tenfold's own schema, per capability, applied before the app's: (folder, name prefix).
BUILTIN = (
    (BUILTIN_DIR, "tenfold"),
    (Path(__file__).parent.parent / "events" / "migrations", "tenfold.events"),
    (Path(__file__).parent.parent / "gateway" / "auth" / "migrations", "tenfold.auth"),
    (Path(__file__).parent.parent / "reshard" / "migrations", "tenfold.reshard"),
)
_DIALECTS = ("sqlite", "postgresql")
_TABLE = """CREATE TABLE IF NOT EXISTS tenfold_migrations (
    name       TEXT PRIMARY KEY,
    checksum   TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)"""
_LOCK_KEY = 0x7E4F01D  # advisory lock id shared by every tenfold migrator


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration: its recorded name and its SQL per dialect (`None` = any)."""

    name: str
    sql: dict[str | None, str]

    def for_dialect(self, dialect: str) -> str:
        return self.sql.get(dialect, self.sql.get(None, ""))

    def checksum(self, dialect: str) -> str:
        return hashlib.sha256(self.for_dialect(dialect).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class MigrationState:
    name: str
    applied_at: float | None
    changed: bool


def discover(folder: Path, target: str, prefix: str) -> list[Migration]:
    """The migrations in `folder/target` (target is `catalog` or `shard`), in order."""
    base = folder / target
    if not base.is_dir():
        return []
    found: dict[str, dict[str | None, str]] = {}
    for path in sorted(base.glob("*.sql")):
        stem = path.name[: -len(".sql")]
        name, _, dialect = stem.rpartition(".")
        if not name or dialect not in _DIALECTS:
            name, dialect = stem, ""
        found.setdefault(f"{prefix}/{name}", {})[dialect or None] = path.read_text()
    return [Migration(name, sql) for name, sql in sorted(found.items())]


def builtin(target: str) -> list[Migration]:
    """tenfold's own migrations for `target` (catalog or shard), capability by capability."""
    return [m for folder, prefix in BUILTIN for m in discover(folder, target, prefix)]


async def state(pool: Pool, migrations: list[Migration]) -> list[MigrationState]:
    """Which of `migrations` are applied on `pool`'s database, and whether any was edited."""
    applied = await _applied(pool)
    out = []
    for m in migrations:
        row = applied.get(m.name)
        out.append(
            MigrationState(
                m.name,
                row[1] if row else None,
                bool(row and row[0] != m.checksum(pool.dialect)),
            )
        )
    return out


async def apply(pool: Pool, migrations: list[Migration]) -> list[str]:
    """Apply the pending `migrations` on `pool`'s database; return the names applied."""
    await _ensure_table(pool)
    done: list[str] = []
    for m in migrations:
        checksum = m.checksum(pool.dialect)
        async with pool.acquire() as conn, conn.transaction():
            if pool.dialect == "postgresql":
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            recorded = await conn.fetchval(
                "SELECT checksum FROM tenfold_migrations WHERE name = $1", m.name
            )
            if recorded is not None:
                if recorded != checksum:
                    raise MigrationError(
                        f"migration {m.name} was edited after it was applied to "
                        f"{pool.name} ({pool.safe_url}); add a new migration instead",
                        shard=pool.name,
                    )
                continue
            try:
                await conn.execute_script(m.for_dialect(pool.dialect))
            except DataError as exc:
                raise MigrationError(
                    f"migration {m.name} failed on {pool.name}: {exc}; nothing of it was applied",
                    shard=pool.name,
                ) from exc
            await conn.execute(
                "INSERT INTO tenfold_migrations (name, checksum, applied_at) VALUES ($1, $2, $3)",
                m.name,
                checksum,
                time.time(),
            )
            done.append(m.name)
    return done


async def applied_names(pool: Pool) -> list[str]:
    """The names of the migrations applied on `pool`'s database."""
    return sorted(await _applied(pool))


async def _ensure_table(pool: Pool) -> None:
    async with pool.acquire() as conn:
        if pool.dialect == "postgresql":
            # Concurrent CREATE TABLE IF NOT EXISTS can still collide in
            # Postgres's catalog (pg_type unique violation): serialise it.
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                await conn.execute(_TABLE)
        else:
            await conn.execute(_TABLE)


async def _applied(pool: Pool) -> dict[str, tuple[str, float]]:
    await _ensure_table(pool)
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT name, checksum, applied_at FROM tenfold_migrations")
    return {r[0]: (r[1], r[2]) for r in rows}
