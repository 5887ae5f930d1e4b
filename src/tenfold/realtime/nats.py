"""NATS broker: realtime across nodes (TENFOLD_EVENTS_URL=nats://...).

- Fan-out: core NATS, one subject per channel, `tf.rt.<channel>` with the name
  escaped to one subject token (`protocol.escape_channel`). A node subscribes
  the subject while it has local subscribers; the payload is the final frame
  text (encoded once by the publishing node); stored frames carry their offset
  in the `Tf-Offset` header.
- History: JetStream stream `TF_RT_HISTORY` on `tf.rth.<channel>`, with
  `max_msgs_per_subject = history_size` and `max_age = history_ttl_s`. The
  offset is the stream sequence: it grows per channel but is not contiguous
  (other channels share the sequence). Each stored message carries the offset
  of the channel's previous message (`Tf-Prev`); stores are chained with
  `Nats-Expected-Last-Subject-Sequence`, so recovery can tell a complete replay
  from one whose start has expired. The epoch is the stream's creation time: a
  deleted and re-created stream (a history reset) is a new epoch.
- Presence and per-user connection counts: JetStream stream `TF_RT_PRESENCE`,
  one subject per entry (`tf.rtp.<channel>.<user>.<name>.<conn>` and
  `tf.rtc.<user>.<slot>`, slot < the per-user limit), one message per
  subject, `max_age` = the presence TTL; each node re-publishes its entries on
  every heartbeat, so a crashed node's entries expire. Counting is a filtered
  stream-info (server side); a connection slot is reserved atomically by a
  store conditional on the subject being empty (`conn_acquire`).
- Connection: the process's shared NATS connection for the URL
  (`tenfold.clients.nats`, shared with the event log); nats-py reconnects it
  and re-subscribes. `close` removes this broker's own subscriptions and
  releases the connection; it is drained and closed by its last holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.js import api

from tenfold.clients.nats import NatsClient, nats_clients
from tenfold.config import redact_url
from tenfold.errors import BrokerUnavailable
from tenfold.realtime.base import Broker, Position
from tenfold.realtime.protocol import escape_channel, msg_frame

__all__ = ["NatsBroker"]

log = logging.getLogger("tenfold.realtime")

HISTORY = "TF_RT_HISTORY"
PRESENCE = "TF_RT_PRESENCE"
_WRONG_LAST_SEQ = 10071


def _token(s: str) -> str:
    """Any text as one subject token: [A-Za-z0-9_-] kept, other UTF-8 bytes as ~xx."""
    out = []
    for b in s.encode():
        c = chr(b)
        if c.isascii() and (c.isalnum() or c in "_-"):
            out.append(c)
        else:
            out.append(f"~{b:02x}")
    return "".join(out) or "~"


def _untoken(t: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(t):
        if t[i] == "~":
            if t[i + 1 : i + 3]:
                raw.append(int(t[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(t[i]))
            i += 1
    return raw.decode(errors="replace")


class NatsBroker(Broker):
    """See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 3.0,
        request_timeout_s: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.url = url
        self.safe_url = redact_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.epoch = ""
        self.client: NatsClient | None = None  # the shared connection, while started
        self._nc: Any = None
        self._js: Any = None
        self._subs: dict[str, Any] = {}
        self._last: dict[str, int] = {}  # channel -> last offset this node knows
        self._slots: dict[str, str] = {}  # connection id -> the slot subject it holds

    @classmethod
    def from_url(cls, url: str, **options: Any) -> NatsBroker:
        """The broker for `nats://host:port` (or `tls://`), with constructor `options`."""
        return cls(url, **options)

    async def start(self, deliver: Any) -> None:
        await super().start(deliver)
        if self.client is None:
            # Bounded (2 x connect_timeout_s); BrokerUnavailable when the server is not there.
            self.client = await nats_clients.acquire(
                self.url, connect_timeout_s=self.connect_timeout_s
            )
        self._nc = self.client.nc
        try:
            self._js = self._nc.jetstream(timeout=self.request_timeout_s)
            await self._ensure_streams()
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await self.close()  # nothing held after a failed start
            raise BrokerUnavailable(self.safe_url, f"realtime cannot connect: {exc!r}") from exc

    async def _ensure_streams(self) -> None:
        history = api.StreamConfig(
            name=HISTORY,
            subjects=["tf.rth.>"],
            max_msgs_per_subject=int(self.history_size),
            max_age=float(self.history_ttl_s),
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
        )
        presence = api.StreamConfig(
            name=PRESENCE,
            subjects=["tf.rtp.>", "tf.rtc.>"],
            max_msgs_per_subject=1,
            max_age=float(self.presence_ttl_s),
            storage=api.StorageType.MEMORY,
            discard=api.DiscardPolicy.OLD,
        )
        for config in (history, presence):
            try:
                info = await self._js.add_stream(config)
            except nats.js.errors.BadRequestError:
                info = await self._js.update_stream(config)  # limits changed
            if config.name == HISTORY:
                self.epoch = _epoch(info)

    async def _refresh_epoch(self) -> None:
        try:
            info = await self._jsm().stream_info(HISTORY)
        except nats.js.errors.NotFoundError:
            await self._ensure_streams()
            self._last.clear()
            return
        epoch = _epoch(info)
        if epoch != self.epoch:
            self.epoch = epoch
            self._last.clear()

    async def close(self) -> None:
        client, self.client, self._nc, self._js = self.client, None, None, None
        subs = list(self._subs.values())
        self._subs.clear()
        for sub in subs:  # the connection is shared: leave nothing of ours on it
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if client is not None:
            await nats_clients.release(client)

    def _conn(self) -> Any:
        if self._nc is None:
            raise BrokerUnavailable(self.safe_url, "realtime: not connected")
        return self._nc

    def _jsm(self) -> Any:
        if self._js is None or self._nc is None:
            raise BrokerUnavailable(self.safe_url, "realtime: not connected")
        return self._js

    async def ping(self) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise BrokerUnavailable(self.safe_url, "realtime: not connected")
        await self._nc.flush(timeout=self.connect_timeout_s)

    # -- fan-out and history ---------------------------------------------------------

    async def publish(self, channel: str, data: bytes, *, ephemeral: bool = False) -> int | None:
        esc = escape_channel(channel)
        if ephemeral:
            await self._conn().publish(
                f"tf.rt.{esc}", msg_frame(channel, data).encode(), headers={"Tf-At": _now()}
            )
            return None
        subject = f"tf.rth.{esc}"
        prev = self._last.get(channel)
        for _ in range(20):
            if prev is None:
                prev = await self._last_seq(subject)
            headers = {"Nats-Expected-Last-Subject-Sequence": str(prev), "Tf-Prev": str(prev)}
            try:
                ack = await self._jsm().publish(subject, data, headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQ:
                    raise
                prev = None  # another node stored in between: chain after it
                continue
            offset = int(ack.seq)
            if offset > self._last.get(channel, 0):
                self._last[channel] = offset
            text = msg_frame(channel, data, self.epoch, offset)
            await self._conn().publish(
                f"tf.rt.{esc}", text.encode(), headers={"Tf-Offset": str(offset), "Tf-At": _now()}
            )
            return offset
        raise BrokerUnavailable(self.safe_url, f"realtime: {channel} is too contended to store")

    async def publish_frame(self, channel: str, text: str) -> None:
        await self._conn().publish(f"tf.rt.{escape_channel(channel)}", text.encode())

    async def subscribe(self, channel: str) -> None:
        if channel in self._subs:
            return

        async def on_msg(msg: Any) -> None:
            offset: int | None = None
            at = 0.0
            headers = msg.headers
            if headers:
                raw = headers.get("Tf-Offset")
                if raw is not None:
                    offset = int(raw)
                    if offset > self._last.get(channel, 0):
                        self._last[channel] = offset
                at = float(headers.get("Tf-At", 0.0))
            self.deliver(channel, offset, msg.data.decode(), at)

        self._subs[channel] = await self._conn().subscribe(
            f"tf.rt.{escape_channel(channel)}", cb=on_msg, pending_msgs_limit=65536
        )
        await self._conn().flush(timeout=self.request_timeout_s)

    async def unsubscribe(self, channel: str) -> None:
        sub = self._subs.pop(channel, None)
        self._last.pop(channel, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _last_seq(self, subject: str) -> int:
        try:
            msg = await self._jsm().get_last_msg(HISTORY, subject)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def position(self, channel: str) -> Position:
        await self._refresh_epoch()
        last = await self._last_seq(f"tf.rth.{escape_channel(channel)}")
        return Position(self.epoch, last)

    async def since(self, channel: str, epoch: str, offset: int) -> list[tuple[int, str]] | None:
        if epoch != self.epoch:
            return None
        subject = f"tf.rth.{escape_channel(channel)}"
        last = await self._last_seq(subject)
        if offset > last:
            return None
        out: list[tuple[int, str]] = []
        seq = offset + 1
        expect_prev = offset
        while seq <= last:
            try:
                msg = await self._jsm().get_msg(HISTORY, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            prev = int((msg.headers or {}).get("Tf-Prev", "-1"))
            if prev != expect_prev:
                return None  # what followed `offset` has expired: resync
            out.append((int(msg.seq), msg_frame(channel, msg.data or b"null", epoch, msg.seq)))
            expect_prev = int(msg.seq)
            seq = int(msg.seq) + 1
        if expect_prev != last:
            return None
        return out

    # -- presence and connection counts -------------------------------------------------

    def _presence_subject(self, channel: str, conn: str, user: str, name: str) -> str:
        return f"tf.rtp.{escape_channel(channel)}.{_token(user)}.{_token(name)}.{_token(conn)}"

    async def presence_add(self, channel: str, conn: str, user: str, name: str) -> None:
        await self._jsm().publish(self._presence_subject(channel, conn, user, name), b"")

    async def presence_remove(self, channel: str, conn: str) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._jsm().purge_stream(
                PRESENCE, subject=f"tf.rtp.{escape_channel(channel)}.*.*.{_token(conn)}"
            )

    async def _count(self, pattern: str) -> int:
        """How many subjects of the presence stream match `pattern`, counted by the server.

        A stream-info request paged past the end: the reply carries the filtered
        `total` and no subject list, so its size does not grow with the count."""
        body = orjson.dumps({"subjects_filter": pattern, "offset": 1 << 31})
        reply = await self._conn().request(
            f"$JS.API.STREAM.INFO.{PRESENCE}", body, timeout=self.request_timeout_s
        )
        info = orjson.loads(reply.data)
        if "error" in info:
            raise BrokerUnavailable(self.safe_url, f"realtime presence count: {info['error']}")
        total = info.get("total")
        if total is None:  # no subject matched: the reply is not paged
            return len((info.get("state") or {}).get("subjects") or {})
        return int(total)

    async def _subjects(self, pattern: str) -> dict[str, int]:
        info = await self._jsm().stream_info(PRESENCE, subjects_filter=pattern)
        return dict(info.state.subjects or {})

    async def presence_list(self, channel: str) -> list[dict[str, str]]:
        seen: dict[str, str] = {}
        for subject in await self._subjects(f"tf.rtp.{escape_channel(channel)}.*.*.*"):
            parts = subject.split(".")
            seen.setdefault(_untoken(parts[3]), _untoken(parts[4]))
        return [{"user": u, "name": n} for u, n in sorted(seen.items())]

    async def presence_users(self, channel: str, users: list[str]) -> set[str]:
        esc = escape_channel(channel)
        counts = await asyncio.gather(
            *(self._count(f"tf.rtp.{esc}.{_token(u)}.*.*") for u in users)
        )
        return {u for u, n in zip(users, counts, strict=True) if n}

    async def conn_acquire(self, user: str, conn: str, limit: int) -> bool:
        """Reserve one of the user's `limit` slots, `tf.rtc.<user>.<n>`, atomically.

        A slot is taken by a store that JetStream accepts only while the slot's
        subject holds no message (`Nats-Expected-Last-Subject-Sequence: 0`), so
        two connections never hold one slot and a burst of any size admits
        exactly the free slots. (Claiming a per-connection subject and then
        counting, as before, made every claim of a burst see the others and
        all refuse: 500 at once, 0 admitted.) The count first refuses a full
        user in one request; probing starts at a random slot so a burst does
        not queue on slot 0.
        """
        prefix = f"tf.rtc.{_token(user)}"
        if await self._count(f"{prefix}.*") >= limit:
            return False
        start = random.randrange(limit)
        for i in range(limit):
            slot = (start + i) % limit
            try:
                await self._jsm().publish(
                    f"{prefix}.{slot}",
                    conn.encode(),
                    headers={"Nats-Expected-Last-Subject-Sequence": "0"},
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQ:
                    raise
                continue  # held by another connection
            self._slots[conn] = f"{prefix}.{slot}"
            return True
        return False

    async def conn_release(self, user: str, conn: str) -> None:
        subject = self._slots.pop(conn, None)
        if subject is None:
            return
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._jsm().purge_stream(PRESENCE, subject=subject)

    async def refresh(
        self, presence: list[tuple[str, str, str, str]], conns: list[tuple[str, str]]
    ) -> None:
        await self._refresh_epoch()
        for channel, conn, user, name in presence:
            await self._conn().publish(self._presence_subject(channel, conn, user, name), b"")
        for _, conn in conns:
            # Renew the slot it holds (a plain publish: one round trip per beat, not
            # per connection). A node stalled past the TTL may find its slot taken
            # and share it until the other leaves: one over the limit at worst.
            slot = self._slots.get(conn)
            if slot is not None:
                await self._conn().publish(slot, conn.encode())
        await self._conn().flush(timeout=self.request_timeout_s)


def _now() -> str:
    return repr(time.time())


def _epoch(info: Any) -> str:
    created = getattr(info, "created", None)
    if created is None:
        return "nats"
    return str(int(created.timestamp() * 1_000_000))
