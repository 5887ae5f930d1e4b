"""PostgreSQL backend: an asyncpg pool per shard database.

The pool is created on first use, not at start-up, so one unreachable shard
does not stop the process from serving keys on the others; a failed creation
is retried by the next acquire after its own bounded connect timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    nullcontext,
)
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tenfold.data.base import (
    Connection,
    Insert,
    Pool,
    PoolStats,
    Record,
    check_identifier,
    register_backend,
)
from tenfold.data.postgres_errors import map_error
from tenfold.errors import (
    DataError,
    MissingDependency,
    ShardTimeout,
    ShardUnavailable,
)
from tenfold.observe import tracing

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependency("asyncpg", "postgres", "a postgresql:// URL") from exc


__all__ = ["PostgresPool"]


_NO_SPAN = nullcontext()


class PostgresConnection(Connection):
    __slots__ = ("_after_commit", "_depth", "_pool", "_raw", "shard", "slot")

    def __init__(self, pool: PostgresPool, raw: Any) -> None:
        self.shard = pool.name
        self._pool = pool
        self._raw = raw
        self.slot = None
        self._after_commit: list[Callable[[], None]] = []
        self._depth = 0

    def _span(self, sql: str) -> AbstractContextManager[Any]:
        if not tracing.enabled():
            return _NO_SPAN
        return tracing.child_span(
            "db.query",
            {"db.system": "postgresql", "tenfold.shard": self.shard, "db.statement": sql[:200]},
        )

    async def execute(self, sql: str, *args: Any, timeout: float | None = None) -> int:
        try:
            with self._span(sql):
                status: str = await self._raw.execute(sql, *args, timeout=timeout)
        except Exception as exc:
            raise _map_error(self._pool, exc, sql, timeout) from exc
        # "INSERT 0 3", "UPDATE 2", "CREATE TABLE": the count is the last word, if any.
        tail = status.rpartition(" ")[2]
        return int(tail) if tail.isdigit() else 0

    async def executemany(
        self, sql: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        try:
            with self._span(sql):
                await self._raw.executemany(sql, args, timeout=timeout)
        except Exception as exc:
            raise _map_error(self._pool, exc, sql, timeout) from exc

    async def fetch(self, sql: str, *args: Any, timeout: float | None = None) -> list[Record]:
        try:
            with self._span(sql):
                rows: list[Record] = await self._raw.fetch(sql, *args, timeout=timeout)
        except Exception as exc:
            raise _map_error(self._pool, exc, sql, timeout) from exc
        return rows

    async def fetchrow(self, sql: str, *args: Any, timeout: float | None = None) -> Record | None:
        try:
            with self._span(sql):
                return await self._raw.fetchrow(sql, *args, timeout=timeout)
        except Exception as exc:
            raise _map_error(self._pool, exc, sql, timeout) from exc

    async def fetchval(
        self, sql: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        try:
            with self._span(sql):
                return await self._raw.fetchval(sql, *args, column=column, timeout=timeout)
        except Exception as exc:
            raise _map_error(self._pool, exc, sql, timeout) from exc

    async def execute_script(self, sql: str) -> None:
        await self.execute(sql)

    async def copy_out(self, sql: str, *args: Any) -> bytes | None:
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(bytes(data))

        try:
            with self._span(sql):
                await self._raw.copy_from_query(sql, *args, output=sink, format="binary")
        except Exception as exc:
            raise _map_error(self._pool, exc, sql, None) from exc
        return b"".join(chunks)

    async def copy_in_raw(self, table: str, columns: Sequence[str], data: bytes) -> int:
        check_identifier(table, self.shard)
        sql = f"COPY {table} FROM STDIN (binary)"
        try:
            with self._span(sql):
                status: str = await self._raw.copy_to_table(
                    table,
                    source=io.BytesIO(data),
                    columns=[check_identifier(c) for c in columns],
                    format="binary",
                )
        except Exception as exc:
            raise _map_error(self._pool, exc, sql, None) from exc
        tail = status.rpartition(" ")[2]
        return int(tail) if tail.isdigit() else 0

    async def copy_in(
        self, table: str, columns: Sequence[str], records: Sequence[Sequence[Any]]
    ) -> None:
        if not records:
            return
        check_identifier(table, self.shard)
        sql = f"COPY {table} FROM STDIN (binary)"
        try:
            with self._span(sql):
                await self._raw.copy_records_to_table(
                    table, records=records, columns=[check_identifier(c) for c in columns]
                )
        except Exception as exc:
            raise _map_error(self._pool, exc, sql, None) from exc

    async def insert_together(self, inserts: Sequence[Insert]) -> None:
        if not inserts:
            return
        args: list[Any] = []
        for p in inserts:
            if p.sharded:
                args.append(self._slot_for(p.table))
            args.extend(p.row.values())
        await self.execute(_together_sql(inserts, self.shard), *args)

    def transaction(self) -> AbstractAsyncContextManager[None]:
        return self._transaction()

    @property
    def in_transaction(self) -> bool:
        return bool(self._raw.is_in_transaction())

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        tx = self._raw.transaction()
        try:
            await tx.start()
        except Exception as exc:
            raise _map_error(self._pool, exc, "BEGIN", None) from exc
        outermost = self._depth == 0
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if outermost:
                self._after_commit.clear()
            try:
                await tx.rollback()
            except Exception as exc:
                raise _map_error(self._pool, exc, "ROLLBACK", None) from exc
            raise
        self._depth -= 1
        try:
            await tx.commit()
        except Exception as exc:
            raise _map_error(self._pool, exc, "COMMIT", None) from exc
        if outermost:
            self._committed()


def _map_error(
    pool: PostgresPool, exc: BaseException, sql: str, timeout: float | None
) -> Exception:
    return map_error(pool.name, pool.safe_url, timeout or pool.options.query_timeout_s, exc, sql)


class _Waiter:
    __slots__ = ("deadline", "done", "expired", "task")

    def __init__(self, deadline: float, task: asyncio.Task[Any]) -> None:
        self.deadline = deadline
        self.task = task
        self.done = False
        self.expired = False


_together_cache: dict[tuple[Any, ...], str] = {}


def _together_sql(inserts: Sequence[Insert], shard: str) -> str:
    """One statement inserting every row: `WITH w0 AS (INSERT ...), ... INSERT ...`."""
    shape = tuple((p.table, tuple(p.row), p.sharded) for p in inserts)
    sql = _together_cache.get(shape)
    if sql is None:
        parts, n = [], 0
        for table, columns, sharded in shape:
            cols = ("slot", *columns) if sharded else columns
            names = ", ".join(check_identifier(c, shard) for c in cols)
            marks = ", ".join(f"${i}" for i in range(n + 1, n + len(cols) + 1))
            n += len(cols)
            parts.append(f"INSERT INTO {check_identifier(table, shard)} ({names}) VALUES ({marks})")
        ctes = ", ".join(f"w{i} AS ({part})" for i, part in enumerate(parts[:-1]))
        sql = f"WITH {ctes} {parts[-1]}" if ctes else parts[-1]
        if len(_together_cache) < 1024:
            _together_cache[shape] = sql
    return sql


async def _keep_session(conn: Any) -> None:
    """A pool `reset` that leaves session state alone (see `Settings.pool_reset`)."""


class _Acquire:
    """`async with pool.acquire()`: a plain class, cheaper than a generator context."""

    __slots__ = ("_pool", "_raw", "_slot")

    def __init__(self, pool: PostgresPool, slot: int | None) -> None:
        self._pool = pool
        self._slot = slot
        self._raw: Any = None

    async def __aenter__(self) -> PostgresConnection:
        # The hot path of every request, kept to one coroutine frame: with at
        # most max_size reserved a free holder is certain, so no timer is needed
        # (asyncpg's acquire(timeout=) starts a task; see _line_up).
        p = self._pool
        pool = p._pool if p._pool is not None else await p._get_pool()
        p._in_use += 1
        try:
            if p._in_use <= p.options.max_size:
                self._raw = await pool.acquire()
            else:
                waiter = p._line_up()
                try:
                    self._raw = await pool.acquire()
                except asyncio.CancelledError:
                    if not waiter.expired:
                        raise
                    waiter.task.uncancel()
                    raise p._waited_too_long(pool) from None
                finally:
                    waiter.done = True
        except DataError:
            p._in_use -= 1
            raise
        except Exception as exc:
            # Whatever asyncpg raised while handing out (or connecting) a
            # connection means the shard cannot serve this request now.
            p._in_use -= 1
            reason = str(exc) or type(exc).__name__
            raise ShardUnavailable(p.name, p.safe_url, reason) from exc
        except BaseException:  # cancelled too: give the reservation back
            p._in_use -= 1
            raise
        conn = PostgresConnection(p, self._raw)
        conn.slot = self._slot
        return conn

    async def __aexit__(self, *exc: object) -> None:
        p = self._pool
        p._in_use -= 1
        raw = self._raw
        holder = getattr(raw, "_holder", None) if p._release_in_place else None
        con = getattr(raw, "_con", None) if holder is not None else None
        if holder is not None and con is not None:
            # What asyncpg's Pool.release does, minus its asyncio.shield: that runs
            # the release in a new task, two more loop steps per query (~40 µs of
            # a send-message request, docs/load-testing.md). With `_keep_session`
            # the release does no I/O unless a transaction was left open, so there
            # is nothing to shield; if a cancellation lands in that ROLLBACK,
            # asyncpg terminates the connection and frees its slot.
            try:
                con._on_release()
                await holder.release(holder._timeout)
            except Exception as exc:
                raise _map_error(p, exc, "(release)", None) from exc
            return
        try:
            await p._pool.release(raw)
        except Exception as exc:
            raise _map_error(p, exc, "(release)", None) from exc


class Listener:
    """A LISTEN connection: `alive()` while it lasts, `await close()` to end it."""

    def __init__(self, raw: Any, timeout_s: float) -> None:
        self._raw = raw
        self._timeout_s = timeout_s

    def alive(self) -> bool:
        return not self._raw.is_closed()

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._raw.close(), self._timeout_s)
        except Exception:
            self._raw.terminate()


@register_backend("postgresql")
class PostgresPool(Pool):
    """An asyncpg pool to one database, created lazily."""

    dialect = "postgresql"

    def __init__(self, name: str, url: str, options: Any) -> None:
        super().__init__(name, url, options)
        self._pool: Any = None
        self._lock = asyncio.Lock()
        self._in_use = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._watchdog: asyncio.Task[None] | None = None
        # Release without asyncpg's shield task (see _Acquire.__aexit__): only with
        # the session-keeping reset, and only where asyncpg has the holder API.
        self._release_in_place = options.reset == "transaction" and hasattr(
            asyncpg.pool.PoolConnectionHolder, "release"
        )

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                self._pool = await self._create()
        return self._pool

    async def _create(self) -> Any:
        opts = self.options
        try:
            async with asyncio.timeout(opts.connect_timeout_s * 2):
                return await asyncpg.create_pool(
                    self.url,
                    min_size=opts.min_size,
                    max_size=opts.max_size,
                    timeout=opts.connect_timeout_s,
                    statement_cache_size=opts.statement_cache_size,
                    # asyncpg rolls back an open transaction before `reset` runs;
                    # `_keep_session` then skips the session reset round trip.
                    reset=_keep_session if opts.reset == "transaction" else None,
                    # The server bounds every statement: a client-side timer per
                    # call (command_timeout) costs ~5% of a short insert. A call's
                    # own timeout= still adds a client-side bound.
                    server_settings={
                        "statement_timeout": str(int(opts.query_timeout_s * 1000)),
                        "idle_in_transaction_session_timeout": str(
                            int(max(opts.query_timeout_s * 2, 60) * 1000)
                        ),
                    },
                )
        except TimeoutError:
            reason = f"no connection within {opts.connect_timeout_s:g} s"
        except asyncpg.InvalidCatalogNameError:
            reason = "the database does not exist; `tenfold db migrate` creates it"
        except Exception as exc:  # every driver error: the shard cannot serve now
            reason = str(exc) or type(exc).__name__
        raise ShardUnavailable(self.name, self.safe_url, reason)

    def acquire(self, slot: int | None = None) -> AbstractAsyncContextManager[Connection]:
        return _Acquire(self, slot)

    def _line_up(self) -> _Waiter:
        """Register a waiter of a saturated pool, bounded by `acquire_timeout_s`.

        Every waiter would otherwise start its own timer; one watchdog per pool
        expires them instead (waiters queue FIFO with the same timeout, so
        their deadlines are in order).
        """
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.time() + self.options.acquire_timeout_s, task)
        self._waiters.append(waiter)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._expire_waiters())
        return waiter

    def _waited_too_long(self, pool: Any) -> Exception:
        opts = self.options
        if pool.get_size() < opts.max_size:
            return ShardUnavailable(
                self.name, self.safe_url, f"no connection within {opts.acquire_timeout_s:g} s"
            )
        return ShardTimeout(
            self.name, opts.acquire_timeout_s, f"acquiring one of {opts.max_size} connections"
        )

    async def _expire_waiters(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiters:
            head = self._waiters[0]
            if head.done:
                self._waiters.popleft()
                continue
            delay = head.deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(min(delay, 0.05))
                continue
            self._waiters.popleft()
            head.expired = True
            head.task.cancel()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.options.connect_timeout_s)
            except TimeoutError:
                pool.terminate()

    def stats(self) -> PoolStats:
        size = self._pool.get_size() if self._pool is not None else 0
        return PoolStats(size=size, in_use=self._in_use, max_size=self.options.max_size)

    async def listen(self, channel: str, callback: Callable[..., None]) -> Listener:
        """LISTEN on `channel` over a dedicated connection (not one of the pool's)."""
        try:
            raw = await asyncpg.connect(self.url, timeout=self.options.connect_timeout_s)
            await raw.add_listener(channel, callback)
        except Exception as exc:  # every driver error: the server cannot be used now
            raise ShardUnavailable(self.name, self.safe_url, f"cannot LISTEN: {exc}") from exc
        return Listener(raw, self.options.connect_timeout_s)

    async def create_database(self) -> bool:
        """Create this pool's database through the server's `postgres` database."""
        parts = urlsplit(self.url)
        dbname = parts.path.lstrip("/")
        if not dbname:
            return False
        admin = urlunsplit(parts._replace(path="/postgres"))
        try:
            conn = await asyncpg.connect(admin, timeout=self.options.connect_timeout_s)
        except Exception as exc:  # every driver error: the server cannot be used now
            raise ShardUnavailable(self.name, self.safe_url, f"cannot reach server: {exc}") from exc
        sql = "CREATE DATABASE"
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname)
            if exists:
                return False
            quoted = '"' + dbname.replace('"', '""') + '"'
            try:
                await conn.execute(f"{sql} {quoted}")
            except asyncpg.DuplicateDatabaseError:
                return False
            return True
        except Exception as exc:
            raise _map_error(self, exc, sql, self.options.connect_timeout_s) from exc
        finally:
            with contextlib.suppress(Exception):  # a lost connection is closed already
                await asyncio.wait_for(conn.close(), self.options.connect_timeout_s)
