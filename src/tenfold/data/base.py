"""The storage interface of the sharded data layer: a pool of connections per database.

Contract every backend keeps:
- SQL uses `$1, $2, ...` placeholders on every backend.
- `fetch` returns records that support `r["col"]`, `r[0]` and `dict(r)`.
- `execute` returns the number of rows the statement changed (0 for DDL).
- `transaction()` nests: an inner block is a savepoint.
- Every call is bounded: acquiring by `acquire_timeout_s`, connecting by
  `connect_timeout_s`, each statement by `query_timeout_s` (or the call's
  `timeout=`). Driver errors leave the backend only as `tenfold.errors` types:
  `ShardUnavailable`, `ShardTimeout`, `QueryError`, `ConstraintViolation`.

Backends register by URL scheme (`@register_backend("sqlite")`) and are made
with `pool_from_url`.
"""

from __future__ import annotations

import abc
import contextlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from tenfold import backends
from tenfold.config import redact_url
from tenfold.errors import QueryError

__all__ = [
    "Connection",
    "Insert",
    "Pool",
    "PoolOptions",
    "PoolStats",
    "Record",
    "pool_from_url",
    "register_backend",
]

Record = Any  # asyncpg.Record or sqlite3.Row: both index by name and position


class Insert(NamedTuple):
    """One row for `Connection.insert_together`.

    `sharded`: the table has a `slot` column that the connection fills in (as
    `insert` does); False inserts `row` exactly as given. A NamedTuple rather
    than a frozen dataclass: two are built per emitted event, and a frozen
    dataclass's `__init__` costs a `object.__setattr__` call per field.
    """

    table: str
    row: Mapping[str, Any]
    sharded: bool = True


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """Sizes and time bounds of one database's pool (see `Settings`)."""

    min_size: int = 1
    max_size: int = 10
    acquire_timeout_s: float = 10.0
    connect_timeout_s: float = 3.0
    query_timeout_s: float = 30.0
    statement_cache_size: int = 512
    reset: str = "transaction"  # "transaction" or "session" (see Settings.pool_reset)


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int
    in_use: int
    max_size: int


class Connection(abc.ABC):
    """One connection to one shard database. Use it inside `async with pool.acquire()`."""

    shard: str
    # Set by the router for `shard_for(key)`: the slot of that key, used by `insert`.
    slot: int | None = None

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any, timeout: float | None = None) -> int:
        """Run one statement; return the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(
        self, sql: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Run one statement once per argument tuple, in one transaction."""

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any, timeout: float | None = None) -> list[Record]:
        """All rows of a query."""

    async def fetchrow(self, sql: str, *args: Any, timeout: float | None = None) -> Record | None:
        """The first row of a query, or None."""
        rows = await self.fetch(sql, *args, timeout=timeout)
        return rows[0] if rows else None

    async def fetchval(
        self, sql: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        """One value of the first row, or None when there is no row."""
        row = await self.fetchrow(sql, *args, timeout=timeout)
        return None if row is None else row[column]

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """A transaction (or, nested, a savepoint): commit on success, roll back on error."""

    _after_commit: list[Callable[[], None]]

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the outermost transaction commits; forget it on rollback.

        Outside a transaction (autocommit) the statement already committed: call now.
        """
        if self.in_transaction:
            self._after_commit.append(callback)
        else:
            callback()

    def _committed(self) -> None:
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    @property
    @abc.abstractmethod
    def in_transaction(self) -> bool:
        """True inside `transaction()`: what an outbox emit needs to be atomic."""

    @abc.abstractmethod
    async def execute_script(self, sql: str) -> None:
        """Run several `;`-separated statements without arguments (migrations)."""

    async def insert(
        self, table: str, row: Mapping[str, Any], *, returning: str | None = None
    ) -> Any:
        """Insert `row` into a sharded table, setting its `slot` column to this key's slot.

        Returns the `returning` column's value when given, else the row count.
        """
        sql = insert_sql(table, ("slot", *row), returning, shard=self.shard)
        args = (self._slot_for(table), *row.values())
        if returning:
            return await self.fetchval(sql, *args)
        return await self.execute(sql, *args)

    async def insert_many(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert rows (all with the same columns) into a sharded table, setting `slot`."""
        if not rows:
            return
        slot = self._slot_for(table)
        sql = insert_sql(table, ("slot", *rows[0]), None, shard=self.shard)
        await self.executemany(sql, [(slot, *r.values()) for r in rows])

    async def insert_together(self, inserts: Sequence[Insert]) -> None:
        """Insert rows into several tables atomically (a state change and its outbox row).

        On PostgreSQL this is one statement (a data-modifying CTE): one round
        trip, and no BEGIN/COMMIT when no transaction is open. Elsewhere the
        inserts run in a transaction (joining the open one, if any).
        """
        async with contextlib.nullcontext() if self.in_transaction else self.transaction():
            for part in inserts:
                if part.sharded:
                    await self.insert(part.table, part.row)
                else:
                    sql = insert_sql(part.table, tuple(part.row), None, shard=self.shard)
                    await self.execute(sql, *part.row.values())

    async def copy_in(
        self, table: str, columns: Sequence[str], records: Sequence[Sequence[Any]]
    ) -> None:
        """Bulk-load `records` (tuples in `columns` order) into `table` as given.

        The resharding copy's write path: PostgreSQL overrides it with binary
        COPY; elsewhere it is one prepared INSERT run per row.
        """
        if records:
            await self.executemany(insert_sql(table, columns, None, shard=self.shard), records)

    async def copy_out(self, sql: str, *args: Any) -> bytes | None:
        """The rows of query `sql` in the engine's binary COPY format, or None where
        the engine has no COPY (then read rows with `fetch`)."""
        return None

    async def copy_in_raw(self, table: str, columns: Sequence[str], data: bytes) -> int:
        """Load `copy_out`'s bytes into `table`; return the row count."""
        raise QueryError(self.shard, "this engine has no binary COPY; use copy_in")

    def _slot_for(self, table: str) -> int:
        if self.slot is None:
            raise QueryError(
                self.shard,
                f"insert into {table!r} needs a slot: open the connection with "
                "db.shard_for(key), not db.shard(name)",
            )
        return self.slot


class Pool(abc.ABC):
    """A bounded set of connections to one database."""

    dialect: ClassVar[str]

    def __init__(self, name: str, url: str, options: PoolOptions) -> None:
        self.name = name
        self.url = url
        self.safe_url = redact_url(url)
        self.options = options

    @abc.abstractmethod
    def acquire(self, slot: int | None = None) -> AbstractAsyncContextManager[Connection]:
        """A connection, returned to the pool when the block ends.

        Args:
            slot: set as `conn.slot` (the router passes the key's slot).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection; the pool can be opened again by the next acquire."""

    @abc.abstractmethod
    def stats(self) -> PoolStats: ...

    async def ping(self) -> float:
        """Round-trip time of `SELECT 1` in milliseconds (raises `ShardUnavailable`)."""
        start = time.perf_counter()
        async with self.acquire() as conn:
            await conn.fetchval("SELECT 1", timeout=self.options.connect_timeout_s)
        return (time.perf_counter() - start) * 1000

    async def create_database(self) -> bool:
        """Create the database if the server allows it; True if it was created."""
        return False


def register_backend(scheme: str) -> Callable[[type[Pool]], type[Pool]]:
    """Class decorator: make `scheme://` shard URLs open this pool class.

    The same as `tenfold.backends.register("data", scheme, cls)`: the one
    registry of every capability's schemes.
    """

    def deco(cls: type[Pool]) -> type[Pool]:
        backends.register("data", scheme, cls)
        return cls

    return deco


def pool_from_url(name: str, url: str, options: PoolOptions | None = None) -> Pool:
    """A pool for `url`, chosen by its scheme in `tenfold.backends`; backends import lazily.

    Raises:
        ConfigError: the scheme is unknown (the message lists the known ones).
    """
    cls: type[Pool] = backends.backend_class("data", url, setting=f"shard {name}")
    return cls(name, url, options or PoolOptions())


def check_identifier(name: str, shard: str = "-") -> str:
    """`name` if it is a plain SQL identifier; refuse anything that could inject SQL."""
    if not _IDENT.match(name):
        raise QueryError(
            shard, f"{name!r} is not a plain SQL identifier (letters, digits, _); nothing was run"
        )
    return name


_insert_cache: dict[tuple[str, tuple[str, ...], str | None], str] = {}


def insert_sql(
    table: str, columns: Sequence[str], returning: str | None, *, shard: str = "-"
) -> str:
    cache_key = (table, tuple(columns), returning)
    sql = _insert_cache.get(cache_key)
    if sql is None:
        cols = ", ".join(check_identifier(c, shard) for c in columns)
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        sql = f"INSERT INTO {check_identifier(table, shard)} ({cols}) VALUES ({marks})"
        if returning:
            sql += f" RETURNING {check_identifier(returning, shard)}"
        if len(_insert_cache) < 4096:
            _insert_cache[cache_key] = sql
    return sql
