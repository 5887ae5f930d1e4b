"""tenfold's uvicorn WebSocket protocol: `/ws` served by the hub with no task while idle.

`tenfold up` runs uvicorn with `ws="tenfold.realtime.wire:HubProtocol"`. After
the HTTP upgrade, this protocol reads the request path: the hub's path (from
the lifespan state `tenfold.install` publishes) is served here, anything else
goes to uvicorn's own sans-I/O protocol and the ASGI app as usual.

Why not the ASGI path for `/ws`: ASGI gives every connection a task running
the app, and the hub added a reader and a writer task, a queue and an event.
An idle connection cost about 30 KiB that way (benchmarks/realtime_memory.py).
Here a connection is a transport, this object, the `websockets` sans-I/O
parser (the library does the handshake, framing and close handshake) and the
hub's `WireConnection`:

- frames from the client wake a short-lived task that answers them in order;
  an idle connection has no task, no queue, no timer;
- frames to the client go straight into the transport, encoded once per
  fan-out and shared by every subscriber; while the transport is paused
  (its buffer is above the high-water mark) frames wait in a deque, and a
  client with more than `send_queue` waiting is closed with 4009;
- one hub-wide timer pings every connection each `ping_interval_s` and closes
  (1011) those that sent nothing, not even a pong, for a whole interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from tenfold.realtime.connection import Connection
from tenfold.realtime.hub import CloseNow, query_token

if TYPE_CHECKING:
    from tenfold.realtime.hub import Hub

__all__ = ["STATE_KEY", "HubProtocol", "WireConnection", "encode_text"]

log = logging.getLogger("tenfold.realtime")

STATE_KEY = "tenfold.realtime"  # lifespan state: (path, hub)
INBOX_MAX = 32  # frames read ahead of the hub before the socket stops being read
_ws_log = logging.getLogger("websockets.server")

_last: tuple[str, bytes] = ("", b"\x81\x00")


def encode_text(text: str) -> bytes:
    """A server text frame (unmasked, unfragmented). Fan-out hands the same `str` to
    every subscriber, so the last one encoded is reused."""
    global _last
    last = _last
    if last[0] is text:
        return last[1]
    payload = text.encode()
    n = len(payload)
    if n < 126:
        frame = bytes((0x81, n)) + payload
    elif n < 65536:
        frame = struct.pack("!BBH", 0x81, 126, n) + payload
    else:
        frame = struct.pack("!BBQ", 0x81, 127, n) + payload
    _last = (text, frame)
    return frame


class WireConnection(Connection):
    """A hub connection whose frames go straight to a `HubProtocol`."""

    __slots__ = ("proto",)

    def __init__(self, proto: HubProtocol, limit: int) -> None:
        super().__init__(limit)
        self.proto = proto

    def push(self, text: str, *, force: bool = False) -> None:
        if self.close_code is None:
            self.proto.send(encode_text(text), force)

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.proto.send_close(code, reason)

    def _drop_queued(self) -> int:
        held = self.proto.held
        self.proto.held = None
        return len(held) if held is not None else 0

    def keepalive(self, now: float) -> None:
        self.proto.keepalive()


class HubProtocol(asyncio.Protocol):
    """See the module docstring. uvicorn builds one per upgraded connection."""

    __slots__ = (
        "app_state",
        "config",
        "conn",
        "fallback",
        "heard",
        "held",
        "hub",
        "inbox",
        "open",
        "partial",
        "server_state",
        "timer",
        "transport",
        "worker",
        "ws",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.transport: asyncio.Transport | None = None
        self.fallback: asyncio.Protocol | None = None
        self.ws: ServerProtocol | None = None
        self.hub: Hub | None = None
        self.conn: WireConnection | None = None
        self.inbox: deque[bytes] | None = None
        self.partial: bytearray | None = None  # a fragmented message being joined
        self.worker: asyncio.Task[None] | None = None
        self.held: deque[bytes] | None = None  # frames waiting while the transport is paused
        self.timer: asyncio.TimerHandle | None = None  # auth deadline, then close deadline
        self.heard = True  # anything from the client since the last keepalive ping
        self.open = False  # admitted by the hub

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server_state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.fallback is not None:
            self.fallback.data_received(data)
            return
        ws = self.ws
        if ws is None:
            self._handshake(data)
            return
        self.heard = True
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        self._flush_protocol()

    def eof_received(self) -> bool | None:
        if self.fallback is not None:
            return self.fallback.eof_received()
        return None

    def pause_writing(self) -> None:
        if self.fallback is not None:
            self.fallback.pause_writing()
        elif self.held is None:
            self.held = deque()

    def resume_writing(self) -> None:
        if self.fallback is not None:
            self.fallback.resume_writing()
            return
        held, self.held = self.held, None
        transport = self.transport
        while held and transport is not None:
            transport.write(held.popleft())
            if self.held is not None:  # paused again by that write
                self.held = held
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        if self.fallback is not None:
            self.fallback.connection_lost(exc)
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.held = self.inbox = self.partial = None
        conn, hub = self.conn, self.hub
        if conn is None or hub is None:
            return
        if conn.close_code is None:
            conn.close_code = 1006  # gone without a close frame: nothing left to send
        if self.worker is not None:
            self.worker.cancel()
        if self.open:
            self.open = False
            task = asyncio.get_running_loop().create_task(hub.cleanup(conn))
            tasks = self.server_state.tasks  # uvicorn waits for these on shutdown
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close with 1012 (service restart)."""
        if self.fallback is not None:
            self.fallback.shutdown()  # type: ignore[attr-defined]
        elif self.conn is not None:
            self.conn.close(1012, "server restarting")
        elif self.transport is not None:
            self.transport.close()

    # -- handshake ----------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        entry = self.app_state.get(STATE_KEY)
        ws = ServerProtocol(max_size=self.config.ws_max_size, logger=_ws_log)
        ws.receive_data(data)
        request = next((e for e in ws.events_received() if isinstance(e, Request)), None)
        path, _, query = (request.path if request is not None else "").partition("?")
        if request is None or entry is None or unquote(path) != entry[0]:
            self._fall_back(data)
            return
        hub: Hub = entry[1]
        response = ws.accept(request)
        ws.send_response(response)
        self.ws = ws
        if response.status_code != 101:  # not a valid WebSocket handshake
            self._flush_protocol()
            self._close_transport()
            return
        self._flush_protocol()
        self.hub = hub
        conn = self.conn = WireConnection(self, hub.limits.send_queue)
        if hub.stopping:
            conn.close(1001, "server shutting down")
            return
        token = query_token(query.encode("latin-1"))
        if token is not None:
            self.worker = asyncio.get_running_loop().create_task(self._work(token))
        else:
            self.timer = asyncio.get_running_loop().call_later(
                hub.limits.auth_timeout_s, self._auth_timeout
            )

    def _fall_back(self, data: bytes) -> None:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        assert self.transport is not None
        self.server_state.connections.discard(self)  # the fallback registers itself
        fallback = WebSocketsSansIOProtocol(self.config, self.server_state, self.app_state)
        self.fallback = fallback
        fallback.connection_made(self.transport)
        fallback.data_received(data)

    def _auth_timeout(self) -> None:
        self.timer = None
        if self.conn is not None and not self.open and self.worker is None:
            self.conn.close(4001, "no auth frame within the timeout")

    # -- frames in ----------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
            self._message(frame)
        elif opcode is Opcode.CLOSE:
            conn = self.conn
            if conn is not None and conn.close_code is None:
                close = self.ws.close_rcvd if self.ws is not None else None
                conn.close_code = close.code if close is not None else 1005
        # PING: the library queued the pong; PONG: `heard` is enough

    def _message(self, frame: Frame) -> None:
        conn = self.conn
        if conn is None or conn.close_code is not None:
            return
        if frame.opcode is Opcode.CONT:  # the library bounds the joined size (max_size)
            if self.partial is None:
                return
            self.partial += frame.data
            if not frame.fin:
                return
            data, self.partial = bytes(self.partial), None
        elif not frame.fin:
            self.partial = bytearray(frame.data)
            return
        else:
            data = bytes(frame.data)
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = deque()
        inbox.append(data)
        if len(inbox) > INBOX_MAX and self.transport is not None:
            self.transport.pause_reading()  # resumed when the worker catches up
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work(None))

    async def _work(self, token: str | None) -> None:
        """Answer the waiting frames in order, then end (idle connections have no task)."""
        hub, conn = self.hub, self.conn
        assert hub is not None and conn is not None
        try:
            if token is not None:
                await self._admit(hub, conn, token, None)
            while self.inbox and conn.close_code is None:
                data = self.inbox.popleft()
                if len(self.inbox) == INBOX_MAX and self.transport is not None:
                    self.transport.resume_reading()
                if self.open:
                    await hub.request(conn, data)
                else:
                    text, ref = hub.auth_frame(data)
                    await self._admit(hub, conn, text, ref)
        except CloseNow as exc:
            conn.close(exc.code, exc.reason)
        except Exception:  # never a crash of the hub: log it and close this one socket
            log.exception("realtime: connection %s failed", conn.id)
            conn.close(1011, "internal error")
        finally:
            self.worker = None
            if self.inbox is not None and not self.inbox:
                self.inbox = None

    async def _admit(self, hub: Hub, conn: WireConnection, token: str, ref: int | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        await hub.admit(conn, token, ref)
        if conn.close_code is not None or self.transport is None or self.transport.is_closing():
            await hub.cleanup(conn)  # it went away while being admitted
            return
        self.open = True

    # -- frames out ---------------------------------------------------------------

    def send(self, frame: bytes, force: bool) -> None:
        held = self.held
        if held is None:
            if self.transport is not None:
                self.transport.write(frame)
            return
        if not force and len(held) >= self.conn.limit:  # type: ignore[union-attr]
            self.conn._overflow("slow consumer: the send queue overflowed")  # type: ignore[union-attr]
            return
        held.append(frame)

    def send_close(self, code: int, reason: str) -> None:
        """Send a close frame after what is queued; drop the socket if it is not answered."""
        ws, transport = self.ws, self.transport
        if ws is None or transport is None or transport.is_closing():
            return
        held, self.held = self.held, None
        if held:
            transport.writelines(held)  # the transport buffers them: no more waiting here
        with contextlib.suppress(Exception):  # already closing: nothing more to say
            ws.send_close(code, reason[:120])
        self._flush_protocol()
        if self.timer is not None:
            self.timer.cancel()
        wait = self.hub.close_wait(code) if self.hub is not None else 2.0
        self.timer = asyncio.get_running_loop().call_later(wait, self._abort)

    def keepalive(self) -> None:
        if not self.heard:
            if self.conn is not None:
                self.conn.close(1011, "keepalive ping timeout")
            self._abort()
            return
        self.heard = False
        if self.ws is not None and self.transport is not None and self.held is None:
            with contextlib.suppress(Exception):
                self.ws.send_ping(b"tf")
            self._flush_protocol()

    def _flush_protocol(self) -> None:
        """Write what the library has to say (handshake, pongs, close frames); its EOF
        marker (an empty chunk) means the closing handshake is over."""
        if self.ws is None or self.transport is None:
            return
        out = self.ws.data_to_send()
        if not out:
            return
        data = b"".join(out)
        if data:
            self.transport.write(data)
        if out[-1] == b"":
            self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _abort(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.abort()
