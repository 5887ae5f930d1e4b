"""SQLite backend: one database file per shard, a bounded set of threaded connections.

Each connection is an `aiosqlite` connection (a thread of its own), so queries
never block the event loop. Files run in WAL mode, so readers proceed while
one writer commits; write transactions start with `BEGIN IMMEDIATE` to take
the write lock up front instead of failing on a lock upgrade mid-transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiosqlite

from tenfold.data.base import Connection, Pool, PoolStats, Record, register_backend
from tenfold.errors import (
    ConstraintViolation,
    InvalidValue,
    QueryError,
    ShardTimeout,
    ShardUnavailable,
    SlotMoved,
)
from tenfold.observe import tracing
from tenfold.resilience import Backoff

__all__ = ["SqlitePool", "to_sqlite_params"]

# Strings, quoted identifiers and comments are copied as they are; only a
# `$n` outside them becomes SQLite's numbered parameter `?n`.
_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|\$(\d+)""", re.DOTALL)


@lru_cache(maxsize=2048)
def to_sqlite_params(sql: str) -> str:
    """Rewrite `$1`-style placeholders to SQLite's `?1`, leaving literals alone."""
    if "$" not in sql:
        return sql
    return _TOKENS.sub(lambda m: f"?{m.group(1)}" if m.group(1) else m.group(0), sql)


def split_statements(script: str) -> list[str]:
    """Complete statements of a script; `;` inside literals and triggers is kept."""
    out, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if _has_code(buf):
                out.append(buf.strip())
            buf = ""
    if _has_code(buf):
        out.append(buf.strip())
    return out


def _has_code(sql: str) -> bool:
    lines = (line.strip() for line in sql.replace(";", "").splitlines())
    return any(line and not line.startswith("--") for line in lines)


def _path_of(url: str) -> Path:
    # sqlite:///rel/path.db is relative to the working directory, sqlite:////abs is absolute.
    rest = url.split("://", 1)[1]
    return Path(rest[1:].split("?", 1)[0])


class SqliteConnection(Connection):
    def __init__(self, pool: SqlitePool, raw: aiosqlite.Connection) -> None:
        self.shard = pool.name
        self._pool = pool
        self._raw = raw
        self._depth = 0
        self.slot = None
        self._after_commit: list[Callable[[], None]] = []

    async def _run(self, sql: str, args: Sequence[Any], timeout: float | None, fetch: bool) -> Any:
        limit = timeout if timeout is not None else self._pool.options.query_timeout_s
        if not tracing.enabled():
            return await self._run_bounded(sql, args, limit, fetch)
        with tracing.child_span(
            "db.query",
            {"db.system": "sqlite", "tenfold.shard": self.shard, "db.statement": sql[:200]},
        ):
            return await self._run_bounded(sql, args, limit, fetch)

    async def _run_bounded(self, sql: str, args: Sequence[Any], limit: float, fetch: bool) -> Any:
        _refuse_nul(self.shard, args, sql)
        try:
            async with asyncio.timeout(limit):
                if fetch:
                    return await self._raw.execute_fetchall(to_sqlite_params(sql), args)
                cursor = await self._raw.execute(to_sqlite_params(sql), args)
                count = cursor.rowcount
                await cursor.close()
                return max(count, 0)
        except TimeoutError:
            await self._raw.interrupt()
            raise ShardTimeout(self.shard, limit) from None
        except asyncio.CancelledError:
            # Cancelled from outside (a scatter's per-shard timeout, a caller's
            # own timeout): stop the statement, or it keeps running in the
            # connection's thread and blocks every later use of the connection.
            await self._raw.interrupt()
            raise
        except (sqlite3.Error, OverflowError) as exc:
            raise _map_error(self._pool, exc, sql) from exc

    async def execute(self, sql: str, *args: Any, timeout: float | None = None) -> int:
        result: int = await self._run(sql, args, timeout, fetch=False)
        return result

    async def fetch(self, sql: str, *args: Any, timeout: float | None = None) -> list[Record]:
        return list(await self._run(sql, args, timeout, fetch=True))

    async def executemany(
        self, sql: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        limit = timeout if timeout is not None else self._pool.options.query_timeout_s
        rows = list(args)
        for row in rows:
            _refuse_nul(self.shard, row, sql)
        try:
            async with self.transaction():
                try:
                    async with asyncio.timeout(limit):
                        await self._raw.executemany(to_sqlite_params(sql), rows)
                except (TimeoutError, asyncio.CancelledError):
                    # Stop the statement before the rollback, which would
                    # otherwise queue behind it in the connection's thread.
                    await self._raw.interrupt()
                    raise
        except TimeoutError:
            raise ShardTimeout(self.shard, limit) from None
        except (sqlite3.Error, OverflowError) as exc:
            raise _map_error(self._pool, exc, sql) from exc

    async def execute_script(self, sql: str) -> None:
        # Not sqlite3's executescript: it commits any open transaction first,
        # which would break an all-or-nothing migration.
        for statement in split_statements(sql):
            await self.execute(statement)

    def transaction(self) -> AbstractAsyncContextManager[None]:
        return self._transaction()

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        depth = self._depth
        name = f"tenfold_sp{depth}"
        await self._control("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth = depth
            if depth == 0:
                self._after_commit.clear()
            try:
                if depth == 0:
                    await self._control("ROLLBACK")
                else:
                    await self._control(f"ROLLBACK TO {name}")
                    await self._control(f"RELEASE {name}")
            except QueryError:
                # An interrupted write (a timeout) makes SQLite roll the whole
                # transaction back itself: nothing is left to undo.
                if self._raw.in_transaction:
                    raise
            raise
        self._depth = depth
        await self._control("COMMIT" if depth == 0 else f"RELEASE {name}")
        if depth == 0:
            self._committed()

    async def _control(self, sql: str) -> None:
        try:
            async with asyncio.timeout(self._pool.options.query_timeout_s):
                await self._raw.execute(sql)
        except TimeoutError:
            raise ShardTimeout(self.shard, self._pool.options.query_timeout_s, sql) from None
        except sqlite3.Error as exc:
            raise _map_error(self._pool, exc, sql) from exc


def _refuse_nul(shard: str, args: Sequence[Any], sql: str) -> None:
    """Refuse text with a NUL character, as PostgreSQL does, so both backends agree.

    SQLite would store it, and the same request would then fail only on
    PostgreSQL ("invalid byte sequence for encoding UTF8: 0x00").
    """
    for arg in args:
        if isinstance(arg, str) and "\x00" in arg:
            raise InvalidValue(
                shard,
                "text contains a NUL character (U+0000) or an escape the database refuses",
                sql=sql,
            )


def _map_error(pool: SqlitePool, exc: sqlite3.Error | OverflowError, sql: str) -> Exception:
    text = str(exc)
    if isinstance(exc, OverflowError):
        # sqlite3 cannot bind an int beyond 64 bits: the input's fault, as on PostgreSQL.
        return InvalidValue(pool.name, "a number is out of range", sql=sql)
    if isinstance(exc, sqlite3.IntegrityError):
        if "tenfold_slot_moved" in text:  # the slot fence of tenfold.reshard.capture
            return SlotMoved(pool.name)
        return ConstraintViolation(pool.name, text, sql=sql)
    if "database is locked" in text or "database is busy" in text:
        return ShardTimeout(pool.name, pool.options.query_timeout_s, "waiting for the write lock")
    if "unable to open" in text or "disk I/O error" in text:
        return ShardUnavailable(pool.name, pool.safe_url, text)
    return QueryError(pool.name, text, sql=sql)


async def _enable_wal(raw: aiosqlite.Connection) -> None:
    # Switching a new file to WAL needs an exclusive lock, and SQLite answers
    # "database is locked" at once (no busy wait) while another connection is
    # committing to it; retry until the caller's connect timeout (the bound),
    # waiting the house backoff (jittered, so racing openers do not retry in step).
    backoff = Backoff(initial_s=0.005, max_s=0.1)
    while True:
        try:
            await raw.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            await asyncio.sleep(backoff.next_s())


_PENDING: set[asyncio.Future[None]] = set()  # rollbacks in flight (kept from GC)


async def _discard(raw: aiosqlite.Connection | None) -> None:
    """Close a connection that failed to open: its thread would keep the process alive."""
    if raw is not None:
        with contextlib.suppress(Exception):
            await raw.close()


@register_backend("sqlite")
class SqlitePool(Pool):
    """Connections to one SQLite file, at most `max_size` open at once."""

    dialect = "sqlite"

    def __init__(self, name: str, url: str, options: Any) -> None:
        super().__init__(name, url, options)
        self.path = _path_of(url)
        self._idle: list[aiosqlite.Connection] = []
        self._size = 0
        self._in_use = 0
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    def acquire(self, slot: int | None = None) -> AbstractAsyncContextManager[Connection]:
        return self._acquire(slot)

    @asynccontextmanager
    async def _acquire(self, slot: int | None) -> AsyncIterator[Connection]:
        self._closed = False
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.options.max_size)
        try:
            async with asyncio.timeout(self.options.acquire_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise ShardTimeout(
                self.name,
                self.options.acquire_timeout_s,
                f"acquiring one of {self.options.max_size} connections",
            ) from None
        raw: aiosqlite.Connection | None = None
        handed_off = False
        try:
            raw = self._idle.pop() if self._idle else await self._open()
            self._in_use += 1
            conn = SqliteConnection(self, raw)
            conn.slot = slot
            failed = False
            try:
                yield conn
            except BaseException:
                failed = True
                raise
            finally:
                self._in_use -= 1
                if failed or conn._depth or raw.in_transaction:
                    # The block failed or was cancelled, maybe mid-transaction. A
                    # cancelled await does not stop a statement already queued on
                    # the connection's thread (a BEGIN IMMEDIATE waiting for the
                    # lock, say), and `in_transaction` cannot see it yet. A rollback
                    # queued behind it undoes it; the connection (and its pool slot)
                    # come back only after that, so no idle connection ever holds
                    # the write lock, and a cancelled caller need not wait for it.
                    self._recycle(raw)
                    handed_off = True
                    raw = None
                elif not self._closed:
                    self._idle.append(raw)
                    raw = None
        finally:
            if raw is not None:
                self._size -= 1
                await raw.close()
            if not handed_off:
                self._slots.release()

    def _recycle(self, raw: aiosqlite.Connection) -> None:
        task = asyncio.ensure_future(self._roll_back_and_return(raw))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)

    async def _roll_back_and_return(self, raw: aiosqlite.Connection) -> None:
        assert self._slots is not None
        try:
            await raw.rollback()
            if self._closed:
                raise ConnectionResetError("pool closed")
            self._idle.append(raw)
        except BaseException:
            self._size -= 1
            with contextlib.suppress(Exception):
                await raw.close()
        finally:
            self._slots.release()

    async def _open(self) -> aiosqlite.Connection:
        opts = self.options
        raw: aiosqlite.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            async with asyncio.timeout(opts.connect_timeout_s):
                pending = aiosqlite.connect(
                    self.path,
                    isolation_level=None,
                    timeout=opts.query_timeout_s,
                    cached_statements=opts.statement_cache_size,
                )
                # A connection someone forgot to close must not keep the process
                # alive at exit (aiosqlite's thread is not a daemon). Committed
                # data is safe: WAL recovers an unclosed connection's file.
                thread = getattr(pending, "_thread", None)
                if thread is not None:
                    thread.daemon = True
                raw = await pending
                raw.row_factory = sqlite3.Row
                await _enable_wal(raw)
                await raw.execute("PRAGMA synchronous=NORMAL")
                await raw.execute("PRAGMA foreign_keys=ON")
        except TimeoutError:
            await _discard(raw)
            raise ShardUnavailable(
                self.name, self.safe_url, f"no connection within {opts.connect_timeout_s:g} s"
            ) from None
        except (OSError, sqlite3.Error) as exc:
            await _discard(raw)
            raise ShardUnavailable(self.name, self.safe_url, str(exc)) from exc
        self._size += 1
        return raw

    async def close(self) -> None:
        # Connections in use when the pool closes are closed on release: an
        # unclosed aiosqlite connection keeps its thread, and the process, alive.
        self._closed = True
        idle, self._idle = self._idle, []
        for raw in idle:
            self._size -= 1
            await raw.close()

    def stats(self) -> PoolStats:
        return PoolStats(size=self._size, in_use=self._in_use, max_size=self.options.max_size)

    async def create_database(self) -> bool:
        existed = self.path.exists()
        async with self.acquire():
            pass
        return not existed
