"""A lean asyncio Redis client: RESP2 over `asyncio.Protocol`, parsed by hiredis.

Why not redis-py: a rate-limit decision is one EVALSHA, and at concurrency 1
the caller pays its whole cost. redis-py spends about 150 µs of Python per
call (connection pool checkout, command packing, stream reader, response
callbacks); Redis answers the same EVALSHA in about 38 µs on loopback
(`redis-benchmark -c 1 -P 1 evalsha ...`: ~26,000/s on the reference box).
This client keeps only what the limiter needs: pack, one `transport.write`,
one future resolved from `data_received`. The figures are in
`benchmarks/limits_decisions.py` and docs/limits.md.

Flow::

    execute(*args) ─▶ connected? ─no─▶ connect (timeout, AUTH, SELECT), shared by
          │                            every caller arriving meanwhile
          ▼
    pack ─▶ transport.write at once (it buffers what the socket does not take)
          │   ─▶ append the caller's future to the FIFO of waiters
          ▼
    data_received ─▶ hiredis.Reader ─▶ each reply resolves the oldest waiter

Invariants:
- The FIFO of waiters and the bytes sent are appended together, in the same
  order, under no await: reply i belongs to waiter i.
- A waiter is never removed because its caller gave up (timeout, cancel): its
  reply still arrives and is dropped, so later callers stay in step.
- When a connection is lost every waiter still pending fails with
  `RespConnectionError`, and that connection is never written to again; the
  next call opens a new one.
- Error replies (`-ERR ...`) are values (`RespReplyError`): raised by
  `execute`, returned in place by `pipeline`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis

from tenfold.config import redact_url
from tenfold.errors import ConfigError
from tenfold.keyspace import BYTES_LIKE

__all__ = ["Arg", "RespClient", "RespConnectionError", "RespReplyError", "pack", "pack_bulk"]

Arg = str | bytes | int | float
"""One command argument; str is sent as UTF-8, numbers in their decimal form."""


class RespReplyError(Exception):
    """An error reply from Redis, e.g. `NOSCRIPT No matching script`.

    Attributes:
        message: the reply's text, starting with its code (`ERR`, `NOSCRIPT`, ...).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RespConnectionError(ConnectionError):
    """Redis could not be reached, or the connection broke with calls in flight."""


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is bytes:
            data = arg
        elif type(arg) is str:
            data = arg.encode()
        elif type(arg) is int:
            data = b"%d" % arg
        elif type(arg) is float:
            data = repr(arg).encode()
        elif isinstance(arg, BYTES_LIKE):
            data = bytes(arg)
        elif isinstance(arg, str):
            data = str(arg).encode()
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise TypeError(f"a Redis argument must be str, bytes, int or float, not {arg!r}")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def pack_bulk(arg: str | bytes) -> bytes:
    """One argument as a RESP bulk string, to splice into a pre-packed command."""
    data = arg.encode() if isinstance(arg, str) else arg
    return b"$%d\r\n%s\r\n" % (len(data), data)


class _Batch:
    """The waiter of a pipeline: collects `size` replies, then resolves `future`."""

    __slots__ = ("future", "replies", "size")

    def __init__(self, future: asyncio.Future[Any], size: int) -> None:
        self.future = future
        self.size = size
        self.replies: list[Any] = []


class _Connection(asyncio.Protocol):
    """One socket: each call written at once, replies matched FIFO."""

    def __init__(self, loop: asyncio.AbstractEventLoop, where: str) -> None:
        self.loop = loop
        self.where = where
        self.reader = hiredis.Reader(replyError=RespReplyError)
        self.waiters: deque[asyncio.Future[Any] | _Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost: Exception | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader, waiters = self.reader, self.waiters
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(RespConnectionError(f"redis at {self.where}: bad reply ({exc})"))
                return
            if reply is False:
                return
            if not waiters:
                self.abort(RespConnectionError(f"redis at {self.where}: reply nobody asked for"))
                return
            waiter = waiters[0]
            if type(waiter) is _Batch:
                waiter.replies.append(reply)
                if len(waiter.replies) < waiter.size:
                    continue
                waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(waiter.replies)
            else:
                waiters.popleft()
                if not waiter.done():  # type: ignore[union-attr]
                    waiter.set_result(reply)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else " (closed by the server)"
        self._fail(RespConnectionError(f"redis at {self.where}: connection lost{reason}"))

    # the client's side
    def send(self, data: bytes, waiter: asyncio.Future[Any] | _Batch) -> None:
        """Write `data` now and queue its waiter in reply order.

        No per-tick write buffer: the transport already keeps what the socket does
        not take, and writing at once lets Redis start on a call while Python
        prepares the next one. Measured in alternating runs against gathering
        the writes of a loop tick into one `write`: faster at concurrency 1 (no
        extra loop pass) and at 64 (Redis and Python overlap on two cores).
        """
        self.waiters.append(waiter)
        self.transport.write(data)  # type: ignore[union-attr]  # set before the first send

    def abort(self, exc: Exception) -> None:
        """Fail every waiter with `exc` and drop the socket."""
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.lost is None:
            self.lost = exc
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            future = waiter.future if type(waiter) is _Batch else waiter
            if not future.done():  # type: ignore[union-attr]
                future.set_exception(type(exc)(*exc.args))  # type: ignore[union-attr]


class RespClient:
    """Redis commands over `connections` sockets, auto-pipelined.

    Concurrent callers write straight away on a shared connection and replies
    come back in order, so N concurrent callers share round trips instead of
    taking turns. A connection belongs to the event loop that opened it.

    Args:
        host, port, db, username, password: where and who; `db` is SELECTed and
            the credentials sent with AUTH on every (re)connect.
        ssl_context: TLS when not None.
        connect_timeout_s: bound on opening one connection, AUTH and SELECT included.
        connections: sockets used round robin (1 is enough for most loads: one
            socket carries tens of thousands of pipelined calls per second).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 1.0,
        connections: int = 1,
        url: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self.password = password
        self.ssl_context = ssl_context
        self.where = redact_url(url) if url else f"{host}:{port}/{db}"
        if not connect_timeout_s > 0:
            raise ConfigError(f"redis at {self.where}", "connect_timeout_s must be > 0")
        if connections < 1:
            raise ConfigError(f"redis at {self.where}", "connections must be >= 1")
        self.connect_timeout_s = connect_timeout_s
        self._slots: list[_Connection | None] = [None] * connections
        self._connecting: list[asyncio.Future[_Connection] | None] = [None] * connections
        self._next = 0
        self._deadlines: dict[float, deque[tuple[float, asyncio.Future[Any]]]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RespClient:
        """A client for `redis://[[user]:password@]host:port/db` or `rediss://...`.

        Args:
            url: the server; the password is never shown in errors or logs.
            options: keyword options as in the constructor.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(redact_url(url), "expected a redis:// or rediss:// URL")
        path = parts.path.strip("/")
        try:
            port = parts.port or 6379
            db = int(path) if path else 0
        except ValueError as exc:
            raise ConfigError(redact_url(url), f"bad port or db number ({exc})") from exc
        if parts.scheme == "rediss":
            options.setdefault("ssl_context", ssl.create_default_context())
        return cls(
            parts.hostname or "127.0.0.1",
            port,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            url=url,
            **options,
        )

    async def execute(self, *args: Arg, timeout_s: float | None = None) -> Any:
        """Send one command and return its reply.

        Args:
            args: the command and its arguments.
            timeout_s: bound on the whole call, connect included (None: only
                the connect is bounded, by `connect_timeout_s`).

        Raises:
            RespReplyError: Redis answered with an error.
            RespConnectionError: connecting failed or the connection broke.
            TimeoutError: no reply within `timeout_s`.
        """
        return await self.execute_packed(pack(args), timeout_s=timeout_s)

    async def execute_packed(self, command: bytes, *, timeout_s: float | None = None) -> Any:
        """`execute` for one command already in RESP (see `pack`).

        For hot paths that pack their constant parts once: the limiter's EVALSHA
        is ~0.7 µs to assemble this way against ~3 µs through `pack`.
        """
        conn = self._pick()
        if conn is None:
            conn, timeout_s = await self._connect_within(timeout_s)
        future: asyncio.Future[Any] = conn.loop.create_future()
        conn.send(command, future)
        if timeout_s is not None:
            self._watch(conn.loop, timeout_s, future)
        reply = await future
        if type(reply) is RespReplyError:
            raise reply
        return reply

    async def pipeline(
        self, commands: Iterable[Sequence[Arg]], *, timeout_s: float | None = None
    ) -> list[Any]:
        """Send `commands` in one write; their replies, in order.

        An error reply is returned in its place as a `RespReplyError`, not raised.

        Args:
            commands: each a command with its arguments.
            timeout_s: bound on the whole call, as in `execute`.

        Raises:
            RespConnectionError: connecting failed or the connection broke.
            TimeoutError: no replies within `timeout_s`.
        """
        packed = [pack(command) for command in commands]
        if not packed:
            return []
        conn = self._pick()
        if conn is None:
            conn, timeout_s = await self._connect_within(timeout_s)
        future: asyncio.Future[list[Any]] = conn.loop.create_future()
        conn.send(b"".join(packed), _Batch(future, len(packed)))
        if timeout_s is not None:
            self._watch(conn.loop, timeout_s, future)
        return await future

    async def close(self) -> None:
        """Close every connection; calls in flight fail with `RespConnectionError`."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._deadlines.clear()
        for i, conn in enumerate(self._slots):
            self._slots[i] = None
            if conn is not None and not conn.closed:
                conn.abort(RespConnectionError(f"redis at {self.where}: client closed"))
        for i, pending in enumerate(self._connecting):
            self._connecting[i] = None
            if pending is not None and not pending.done():
                pending.cancel()

    def _watch(
        self, loop: asyncio.AbstractEventLoop, timeout_s: float, future: asyncio.Future[Any]
    ) -> None:
        """Fail `future` with TimeoutError if it is not done within `timeout_s`.

        Not a timer per call (`asyncio.timeout`, `call_later`: ~5-10 µs each, a
        heap push and a cancelled handle): calls with the same `timeout_s` expire
        in the order they were made, so one FIFO and one timer per distinct
        `timeout_s` do, and a finished call costs one append and one pop.
        """
        queue = self._deadlines.get(timeout_s)
        if queue is None:
            queue = self._deadlines[timeout_s] = deque()
        while queue and queue[0][1].done():  # finished calls leave from the front
            queue.popleft()
        queue.append((loop.time() + timeout_s, future))
        if timeout_s not in self._timers:
            self._timers[timeout_s] = loop.call_at(queue[0][0], self._expire, loop, timeout_s)

    def _expire(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        queue = self._deadlines[timeout_s]
        now = loop.time()
        while queue:
            deadline, future = queue[0]
            if not future.done():
                if deadline > now:
                    break
                future.set_exception(TimeoutError())
            queue.popleft()
        if queue:
            self._timers[timeout_s] = loop.call_at(queue[0][0], self._expire, loop, timeout_s)
        else:  # bounded by the distinct timeouts in use right now
            del self._timers[timeout_s], self._deadlines[timeout_s]

    def _pick(self) -> _Connection | None:
        """The next connection round robin, or None if it must be (re)opened."""
        slots = self._slots
        i = self._next
        if len(slots) > 1:
            self._next = (i + 1) % len(slots)
            i = self._next
        conn = slots[i]
        if conn is None or conn.closed:
            return None
        return conn

    async def _connect_within(self, timeout_s: float | None) -> tuple[_Connection, float | None]:
        """Connect (within `timeout_s` if given); the connection and the time left."""
        if timeout_s is None:
            return await self._connect(self._next), None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with asyncio.timeout_at(deadline):
            conn = await self._connect(self._next)
        return conn, max(deadline - loop.time(), 0.0)

    async def _connect(self, i: int) -> _Connection:
        """Open connection `i`, or join the attempt already under way."""
        pending = self._connecting[i]
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.create_task(self._open())
            self._connecting[i] = pending
            pending.add_done_callback(lambda _: self._connected(i, pending))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if pending.cancelled() and (task is None or not task.cancelling()):
                # close() stopped the attempt: this caller was not cancelled itself
                raise RespConnectionError(f"redis at {self.where}: client closed") from None
            raise

    def _connected(self, i: int, attempt: asyncio.Future[_Connection]) -> None:
        if self._connecting[i] is attempt:
            self._connecting[i] = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._slots[i] = attempt.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self.where)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context else None,
                )
                hello: dict[str, tuple[Arg, ...]] = {}
                if self.password is not None:
                    user: tuple[Arg, ...] = (self.username,) if self.username else ()
                    hello["AUTH"] = ("AUTH", *user, self.password)
                if self.db:
                    hello["SELECT"] = ("SELECT", self.db)
                if hello:
                    future: asyncio.Future[list[Any]] = loop.create_future()
                    conn.send(b"".join(map(pack, hello.values())), _Batch(future, len(hello)))
                    for name, reply in zip(hello, await future, strict=True):
                        if isinstance(reply, RespReplyError):
                            raise RespConnectionError(
                                f"redis at {self.where}: {name} failed: {reply.message}; "
                                "check the user, password and db number in the URL"
                            )
        except TimeoutError as exc:
            conn.abort(RespConnectionError("connect timed out"))
            raise RespConnectionError(
                f"redis at {self.where}: no connection within {self.connect_timeout_s:g} s"
            ) from exc
        except OSError as exc:
            conn.abort(RespConnectionError(str(exc)))
            if isinstance(exc, RespConnectionError):
                raise
            raise RespConnectionError(
                f"redis at {self.where}: cannot connect ({exc.strerror or exc}); "
                "is the server running?"
            ) from exc
        except BaseException:
            conn.abort(RespConnectionError("connect cancelled"))
            raise
        return conn
