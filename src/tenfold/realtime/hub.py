"""`Hub`: the WebSocket connections of one node, their subscriptions and fan-out.

hub = Hub(broker, authenticate=verify)     # verify(token) -> principal or None
hub.authorize = my_check                   # async (principal, channel, action) -> bool
await hub.start()
await hub.serve(websocket)                 # one per connection (the /ws endpoint)
await hub.publish("room:42", {"body": "hi"})
await hub.stop()                           # clients are closed with 1001

Two ways in: `serve` runs one connection of any ASGI server (a task reading,
a writer task draining a bounded queue), and `wire.HubProtocol`, tenfold's
uvicorn WebSocket protocol, runs `/ws` connections with no task at all while
they idle (see connection.py and wire.py). Either way fan-out hands one shared,
already-encoded frame to each subscriber and never waits on a socket, so a
slow client cannot slow the others; one with more than `send_queue` frames
waiting is closed with 4009. Actions passed to `authorize`:
"read" (subscribe, presence), "publish" (stored publish), "ephemeral"
(a publish that is delivered but not stored, e.g. typing indicators).
Join/leave frames go only to subscribers that asked for them (`join_leave`),
once per user, coalesced per channel (`presence.PresenceEvents`).
Access ends with authorization: `revoke(channel, user)` on every node, and a
periodic re-check as a safety net (`access.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson

from tenfold.errors import BrokerUnavailable
from tenfold.realtime import metrics
from tenfold.realtime import protocol as p
from tenfold.realtime.access import Reauthorizer, revoke_frame, revoked_user
from tenfold.realtime.base import Broker
from tenfold.realtime.connection import Connection, QueuedConnection
from tenfold.realtime.presence import PresenceEvents
from tenfold.resilience.backoff import Backoff

__all__ = ["Authorize", "CloseNow", "Hub", "HubLimits", "PrincipalLike", "default_authorize"]

log = logging.getLogger("tenfold.realtime")


class PrincipalLike(Protocol):
    @property
    def subject(self) -> str: ...
    @property
    def claims(self) -> dict[str, Any]: ...


Authorize = Callable[[Any, str, str], Awaitable[bool]]


async def default_authorize(principal: Any, channel: str, action: str) -> bool:
    """Deny everything except the caller's own channel "user:<subject>"."""
    return bool(channel == f"user:{principal.subject}")


@dataclass(frozen=True, slots=True)
class HubLimits:
    max_frame_bytes: int = 16 * 1024
    auth_timeout_s: float = 10.0
    send_queue: int = 256
    max_channels: int = 100
    publish_rate: float = 20.0
    publish_burst: int = 40
    max_conns_per_user: int = 20
    close_timeout_s: float = 2.0
    presence_window_s: float = 0.05  # join/leave frames of a channel are coalesced over this
    # WebSocket pings from the hub itself (tenfold's uvicorn protocol; other servers ping)
    ping_interval_s: float = 20.0
    # every subscription's authorization is asked again this often (access.py)
    reauthorize_interval_s: float = 30.0


class Hub:
    """See the module docstring."""

    def __init__(
        self,
        broker: Broker,
        *,
        authenticate: Callable[[str], Any],
        limits: HubLimits | None = None,
        authorize: Authorize | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.authenticate = authenticate
        self.limits = limits or HubLimits()
        self.authorize: Authorize = authorize or default_authorize
        self.clock = clock
        self.channels: dict[str, set[Connection]] = {}
        self.watchers: dict[str, set[Connection]] = {}  # subscribers that want join/leave
        self.connections: set[Connection] = set()
        self.presence = PresenceEvents(broker, self.limits.presence_window_s)
        # which process a client landed on (in the auth `ok` frame)
        self.node = f"{socket.gethostname()}:{os.getpid()}"
        metrics.track(self)
        self._locks: dict[str, asyncio.Lock] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reauthorizing: asyncio.Task[None] | None = None
        self._leaving: set[asyncio.Task[None]] = set()  # broker cleanup of dropped subscriptions
        self.started = False
        self.stopping = False

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        if self.started:
            return
        self.stopping = False
        self.started = True
        try:
            await self.broker.start(self._deliver)
        except BrokerUnavailable as exc:
            # Like the event bus: the app starts; sockets get 1011 until the broker answers.
            log.warning("realtime starting without its broker, will retry: %s", exc)
            self._connecting = asyncio.create_task(self._connect_loop(), name="realtime:connect")
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="realtime:heartbeat")
        self._pinger = asyncio.create_task(self._ping_loop(), name="realtime:ping")
        recheck = Reauthorizer(
            lambda *args: self.authorize(*args), self.drop, self.limits.reauthorize_interval_s
        )
        self._reauthorizing = asyncio.create_task(
            recheck.run(lambda: tuple(self.connections)), name="realtime:reauthorize"
        )

    async def _connect_loop(self) -> None:
        backoff = Backoff(0.2, 5.0)  # the house's one capped, jittered wait
        while True:
            await asyncio.sleep(backoff.next_s())
            try:
                await self.broker.start(self._deliver)
            except BrokerUnavailable as exc:
                log.warning("realtime broker still unavailable: %s", exc)
            else:
                return

    async def stop(self) -> None:
        """Close every client with 1001 (reconnect elsewhere), then the broker."""
        if not self.started:
            return
        self.stopping = True
        for conn in list(self.connections):
            conn.close(1001, "server shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.close_timeout_s + 1):
                while self.connections:  # noqa: ASYNC110 - serve() removes them
                    await asyncio.sleep(0.02)
        with contextlib.suppress(Exception):
            await self.presence.close()  # the last leaves
        for task in (self._heartbeat, self._pinger, self._connecting, self._reauthorizing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._connecting = None
        self.started = False
        await self.broker.close()

    async def _ping_loop(self) -> None:
        """One timer for every connection (not one per socket): see `Connection.keepalive`."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.limits.ping_interval_s)
            now = loop.time()
            for conn in tuple(self.connections):
                conn.keepalive(now)

    async def _heartbeat_loop(self) -> None:
        every = max(0.05, self.broker.presence_ttl_s / 3)
        while True:
            await asyncio.sleep(every)
            presence = [(ch, c.id, c.user, c.name) for c in self.connections for ch in c.channels]
            conns = [(c.user, c.id) for c in self.connections if c.user]
            for ch in [c for c, lock in self._locks.items() if not lock.locked()]:
                if ch not in self.channels:
                    del self._locks[ch]
            try:
                await self.broker.refresh(presence, conns)
            except Exception as exc:  # the next beat retries; entries live for a TTL
                log.warning("realtime heartbeat failed: %s", exc)

    # -- server-side publish ------------------------------------------------------

    async def publish(self, channel: str, data: Any, *, ephemeral: bool = False) -> int | None:
        """Publish `data` (JSON-able) to `channel` on every node; the offset, unless ephemeral."""
        p.check_channel(channel)
        return await self.broker.publish(channel, orjson.dumps(data), ephemeral=ephemeral)

    async def publish_json(
        self, channel: str, payload: bytes, *, ephemeral: bool = False
    ) -> int | None:
        """`publish` for data already encoded as one JSON document, such as the
        payload of an event emitted with a JSON-able payload: it is passed on as
        it is, without a decode and a re-encode per event. Not validated: bytes
        that are not JSON reach clients as a broken frame."""
        p.check_channel(channel)
        return await self.broker.publish(channel, payload, ephemeral=ephemeral)

    async def revoke(self, channel: str, user: str) -> int:
        """End `user`'s subscriptions to `channel` on every node (call it once the
        change that took the right away has committed). Returns how many ended here.

        Connections are told with `{"op":"unsub","ch":...,"reason":"revoked"}`.
        A broker failure is logged, not raised: the periodic re-check ends the
        other nodes' subscriptions within `reauthorize_interval_s` instead.
        """
        p.check_channel(channel)
        dropped = self._revoke_here(channel, user)
        try:
            await self.broker.publish_frame(channel, revoke_frame(channel, user))
            await self.broker.ping()  # a flush: later publishes are ordered after it
        except Exception as exc:
            log.warning(
                "realtime: revoking %s for user %s reached only this node (%r); the re-check "
                "every %g s ends it elsewhere",
                channel,
                user,
                exc,
                self.limits.reauthorize_interval_s,
            )
        return dropped

    def _revoke_here(self, channel: str, user: str) -> int:
        subs = self.channels.get(channel)
        if not subs:
            return 0
        mine = [conn for conn in subs if conn.user == user]
        for conn in mine:
            self.drop(conn, channel, "revoked")
        if mine:
            metrics.refusals.labels("revoked").inc(len(mine))
        return len(mine)

    def drop(self, conn: Connection, channel: str, reason: str) -> None:
        """End one subscription from the server side: no frame of `channel` reaches
        `conn` after this call; the client gets an `unsub` frame saying why."""
        if channel not in conn.channels:
            return
        conn.channels.discard(channel)
        subs = self.channels.get(channel)
        if subs is not None:
            subs.discard(conn)  # the set itself goes (and the broker unsubscribes) in _leave
        watching = self.watchers.get(channel)
        if watching is not None:
            watching.discard(conn)
        conn.push(p.frame({"op": "unsub", "ch": channel, "reason": reason}), force=True)
        task = asyncio.get_running_loop().create_task(self._leave_quietly(conn, channel))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _leave_quietly(self, conn: Connection, channel: str) -> None:
        try:
            await self._leave(conn, channel)
        except Exception as exc:  # presence entries expire by TTL; nothing else is left
            log.warning("realtime: leaving %s after its access ended failed: %r", channel, exc)

    def _deliver(self, channel: str, offset: int | None, text: str, at: float) -> None:
        if offset is None and (user := revoked_user(text)) is not None:
            self._revoke_here(channel, user)  # from another node (or our own, again)
            return
        if offset is None and p.is_presence_frame(text):
            subs = self.watchers.get(channel)
            if subs:
                for conn in tuple(subs):
                    conn.deliver(channel, offset, text)
            return
        subs = self.channels.get(channel)
        if subs:
            for conn in tuple(subs):
                conn.deliver(channel, offset, text)
            metrics.delivered.inc(len(subs))
            if at:
                metrics.publish_to_send.observe(max(0.0, time.time() - at))

    # -- one connection -----------------------------------------------------------

    def auth_frame(self, text: str | bytes) -> tuple[str, int | None]:
        """The token and ref of a connection's first frame, which must be `auth`."""
        try:
            req = p.parse(text, self.limits.max_frame_bytes)
        except p.Malformed as exc:
            raise CloseNow(4000, str(exc)) from None
        except p.BadFrame as exc:
            raise CloseNow(4001, f"the first frame must be auth: {exc.message}") from None
        if req.op != "auth":
            raise CloseNow(4001, 'the first frame must be {"op":"auth",...}')
        return req.token, req.ref

    async def admit(self, conn: Connection, token: str, ref: int | None) -> None:
        """Authenticate `conn`, count it against its user's limit, send the `ok` frame."""
        principal = self.authenticate(token)
        if principal is None:
            raise CloseNow(4001, "invalid or expired access token")
        conn.principal = principal
        conn.user = str(principal.subject)
        conn.name = str(principal.claims.get("name", "") or conn.user)
        try:
            admitted = await self.broker.conn_acquire(
                conn.user, conn.id, self.limits.max_conns_per_user
            )
        except Exception as exc:  # the broker is down: try again later / elsewhere
            log.warning("realtime: cannot count connections: %r", exc)
            raise CloseNow(1011, "realtime broker unavailable; reconnect later") from None
        if not admitted:
            metrics.refusals.labels("connections").inc()
            raise CloseNow(4008, "too many connections for this user")
        self.connections.add(conn)
        ok: dict[str, Any] = {"op": "ok", "user": conn.user, "conn": conn.id, "node": self.node}
        if ref is not None:
            ok["ref"] = ref
        conn.push(p.frame(ok))
        conn.tokens = float(self.limits.publish_burst)
        conn.tokens_at = self.clock()

    async def serve(self, scope: Any, receive: Any, send: Any) -> None:
        """Run one WebSocket connection (an ASGI websocket scope) to its end."""
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        if self.stopping:
            await send({"type": "websocket.close", "code": 1001})
            return
        await send({"type": "websocket.accept"})
        conn = QueuedConnection(send, self.limits.send_queue)
        ref: int | None = None
        token = query_token(scope.get("query_string", b""))
        try:
            if token is None:
                try:
                    async with asyncio.timeout(self.limits.auth_timeout_s):
                        msg = await receive()
                except TimeoutError:
                    raise CloseNow(4001, "no auth frame within the timeout") from None
                if msg["type"] == "websocket.disconnect":
                    return
                token, ref = self.auth_frame(_text(msg))
            await self.admit(conn, token, ref)
        except CloseNow as exc:
            await _close(send, exc.code, exc.reason)
            return
        writer = conn.writer = asyncio.create_task(conn.write_loop())
        reader = asyncio.create_task(self._read_loop(conn, receive))
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not writer.done():
                if conn.close_code is None:
                    writer.cancel()  # the client went away
                else:  # flush what is queued, then close
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                        async with asyncio.timeout(self.limits.close_timeout_s):
                            await writer
            if not reader.done():
                reader.cancel()
            if conn.close_code is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.close_wait(conn.close_code)):
                        await _close(send, conn.close_code, conn.close_reason)
        finally:
            for task in (writer, reader):
                if not task.done():
                    task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            await self.cleanup(conn)

    def close_wait(self, code: int) -> float:
        """How long a close frame may take to leave: a slow consumer's socket is full."""
        return self.limits.close_timeout_s * (5 if code == 4009 else 1)

    async def cleanup(self, conn: Connection) -> None:
        """Forget a connection that has ended: its channels, presence and user slot."""
        if conn not in self.connections:
            return  # never admitted, or already cleaned up
        self.connections.discard(conn)
        conn.close_code = conn.close_code or 1000
        for ch in list(conn.channels):
            with contextlib.suppress(Exception):
                await self._leave(conn, ch)
        with contextlib.suppress(Exception):
            await self.broker.conn_release(conn.user, conn.id)

    async def _read_loop(self, conn: Connection, receive: Any) -> None:
        while conn.close_code is None:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            await self.request(conn, _text(msg))

    async def request(self, conn: Connection, text: str | bytes) -> None:
        """Answer one frame of an admitted connection; a malformed one closes it (4000)."""
        try:
            req = p.parse(text, self.limits.max_frame_bytes)
        except p.Malformed as exc:
            conn.close(4000, str(exc)[:120])
            return
        except p.BadFrame as exc:
            conn.push(p.error_frame(exc.code, exc.message, exc.ref))
            return
        try:
            await self._handle(conn, req)
        except p.BadFrame as exc:
            conn.push(p.error_frame(exc.code, exc.message, exc.ref))
        except Exception as exc:  # a failing broker or check answers, never crashes
            log.exception("realtime: %s on %s failed", req.op, req.ch)
            conn.push(
                p.error_frame("unavailable", f"{req.op} failed: {type(exc).__name__}", req.ref)
            )

    async def _handle(self, conn: Connection, req: p.Request) -> None:
        op, ref, ch = req.op, req.ref, req.ch
        if op == "ping":
            conn.push(p.frame({"op": "pong", "ref": ref} if ref is not None else {"op": "pong"}))
        elif op == "sub":
            await self._sub(conn, req)
        elif op == "unsub":
            if ch not in conn.channels:
                raise p.BadFrame("not_subscribed", f"not subscribed to {ch}", ref)
            await self._leave(conn, ch)
            conn.push(_ok(ref))
        elif op == "pub":
            action = "ephemeral" if req.ephemeral else "publish"
            if not await self.authorize(conn.principal, ch, action):
                raise p.BadFrame("forbidden", f"no right to {action} on {ch}", ref)
            if not self._take_token(conn):
                metrics.refusals.labels("publish_rate").inc()
                raise p.BadFrame(
                    "rate_limited",
                    f"at most {self.limits.publish_rate:g} publishes per second per connection",
                    ref,
                )
            offset = await self.broker.publish(ch, req.data, ephemeral=req.ephemeral)
            if ref is not None:
                answer: dict[str, Any] = {"op": "ok", "ref": ref}
                if offset is not None:
                    answer["offset"] = offset
                conn.push(p.frame(answer))
        elif op == "presence":
            if ch not in conn.channels and not await self.authorize(conn.principal, ch, "read"):
                raise p.BadFrame("forbidden", f"no right to read {ch}", ref)
            members = await self.broker.presence_list(ch)
            out: dict[str, Any] = {"op": "presence", "ch": ch, "members": members}
            if ref is not None:
                out["ref"] = ref
            conn.push(p.frame(out))
        elif op == "auth":
            raise p.BadFrame("bad_request", "already authenticated", ref)

    def _take_token(self, conn: Connection) -> bool:
        now = self.clock()
        lim = self.limits
        conn.tokens = min(
            float(lim.publish_burst), conn.tokens + (now - conn.tokens_at) * lim.publish_rate
        )
        conn.tokens_at = now
        if conn.tokens < 1.0:
            return False
        conn.tokens -= 1.0
        return True

    def _lock(self, ch: str) -> asyncio.Lock:
        lock = self._locks.get(ch)
        if lock is None:
            lock = self._locks[ch] = asyncio.Lock()
        return lock

    async def _sub(self, conn: Connection, req: p.Request) -> None:
        ch, ref = req.ch, req.ref
        if ch in conn.channels:
            raise p.BadFrame("bad_request", f"already subscribed to {ch}", ref)
        if len(conn.channels) >= self.limits.max_channels:
            metrics.refusals.labels("channels").inc()
            raise p.BadFrame(
                "limit", f"at most {self.limits.max_channels} channels per connection", ref
            )
        if not await self.authorize(conn.principal, ch, "read"):
            raise p.BadFrame("forbidden", f"no right to read {ch}", ref)
        conn.hold(ch)
        try:
            async with self._lock(ch):
                subs = self.channels.get(ch)
                if subs is None:
                    subs = self.channels[ch] = set()
                    try:
                        await self.broker.subscribe(ch)
                    except BaseException:
                        del self.channels[ch]
                        raise
                subs.add(conn)
                if req.join_leave:
                    watching = self.watchers.get(ch)
                    if watching is None:
                        watching = self.watchers[ch] = set()
                    watching.add(conn)
            conn.channels.add(ch)
            pos = await self.broker.position(ch)
            ok: dict[str, Any] = {"op": "ok", "ch": ch, "epoch": pos.epoch, "offset": pos.offset}
            if ref is not None:
                ok["ref"] = ref
            last = pos.offset
            missed: list[tuple[int, str]] = []
            if req.since is not None:
                got = await self.broker.since(ch, req.since[0], req.since[1])
                ok["recovered"] = got is not None
                if got is not None:
                    missed = got
            # In the presence before the client hears `ok`: a presence query it
            # (or anyone it tells) makes next, on any node, must list it.
            await self.broker.presence_add(ch, conn.id, conn.user, conn.name)
            conn.push(p.frame(ok), force=True)
            for stored, text in missed:
                conn.push(text, force=True)
                last = max(last, stored)
            self.presence.joined(ch, conn.user, conn.name)  # nothing can fail after this
        except BaseException:
            conn.release(ch)
            if ch in conn.channels:
                with contextlib.suppress(Exception):
                    await self._leave(conn, ch, joined=False)
            raise
        for live, text in conn.release(ch):
            if live is None or live > last:
                conn.push(text)

    async def _leave(self, conn: Connection, ch: str, *, joined: bool = True) -> None:
        conn.channels.discard(ch)
        watching = self.watchers.get(ch)
        if watching is not None:
            watching.discard(conn)
            if not watching:
                del self.watchers[ch]
        try:
            async with self._lock(ch):
                subs = self.channels.get(ch)
                if subs is not None:
                    subs.discard(conn)
                    if not subs:
                        del self.channels[ch]
                        await self.broker.unsubscribe(ch)
            await self.broker.presence_remove(ch, conn.id)
        finally:
            if joined:
                self.presence.left(ch, conn.user, conn.name)


class CloseNow(Exception):
    """End a connection with this close code (raised while it is being set up)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _ok(ref: int | None) -> str:
    return p.frame({"op": "ok", "ref": ref} if ref is not None else {"op": "ok"})


def _text(msg: dict[str, Any]) -> str | bytes:
    text = msg.get("text")
    if text is not None:
        return str(text)
    data = msg.get("bytes")
    return bytes(data) if data is not None else b""


def query_token(qs: bytes) -> str | None:
    """The `token` query parameter of a WebSocket URL, if any."""
    if not qs:
        return None
    values = parse_qs(qs.decode("latin-1")).get("token")
    return values[0] if values else None


async def _close(send: Any, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await send({"type": "websocket.close", "code": code, "reason": reason[:120]})
