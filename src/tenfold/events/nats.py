"""NATS JetStream backend.

    topic  chat.messages  → stream TF_CHAT_MESSAGES, subjects tf.chat.messages.<partition>
    DLQ                   → stream TFDLQ_CHAT_MESSAGES, subject tfdlq.chat.messages.<group>
    group g, partition p  → durable pull consumer g_p<p> filtered to that partition's subject,
                            max_ack_pending=1 (strict order), explicit ack

The event id travels as `Nats-Msg-Id` (the stream de-duplicates within its
duplicate window); slot, time and key share one `Tf-Meta` header.

Connection: the process's shared NATS connection for the URL
(`tenfold.clients.nats`, shared with the realtime broker); nats-py reconnects
it. A partition worker whose fetch fails waits `tenfold.resilience.Backoff`
before the next one.

Durability: JetStream acknowledges a write before it reaches disk unless the
server runs with
`jetstream { sync_interval: always }`; the local stack and the fault tests do,
and docs/events.md says what production needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote

from tenfold.config import redact_url
from tenfold.errors import BrokerUnavailable, MissingDependency, TopicError
from tenfold.events.base import (
    DeadLetter,
    Delivery,
    Event,
    GroupStatus,
    Handler,
    RetryPolicy,
    StartPosition,
    StreamBackend,
    TopicSpec,
    TopicStatus,
)
from tenfold.events.dispatch import deliver
from tenfold.resilience.backoff import Backoff

try:
    import nats.errors
    import nats.js.errors
    from nats.js import api

    from tenfold.clients.nats import NatsClient, nats_clients
except ImportError as exc:  # pragma: no cover - only without the extra
    raise MissingDependency("nats-py", "nats", "a nats:// events URL") from exc

__all__ = ["NatsStreams"]

log = logging.getLogger("tenfold.events.nats")
_APP = "Tf-H-"
_BROKER_ERRORS = (nats.errors.Error, OSError, TimeoutError)


def stream_name(topic: str) -> str:
    return "TF_" + topic.replace(".", "_").upper()


def dlq_stream_name(topic: str) -> str:
    return "TFDLQ_" + topic.replace(".", "_").upper()


def _headers(event: Event) -> dict[str, str]:
    # Two headers, not five: nats-py encodes each one, and per-header cost was
    # a fifth of the relay's publish time (benchmarks/relay_publish.py).
    headers = {
        "Nats-Msg-Id": event.dedup_id,
        # The key is quoted: header values cannot hold line breaks, and keys may.
        "Tf-Meta": f"{event.slot} {event.created_at!r} {quote(event.key, safe='')}",
    }
    if event.msg_id and event.msg_id != event.id:
        headers["Tf-Event-Id"] = event.id
    for name, value in event.headers.items():
        headers[_APP + name] = value
    return headers


def _event(topic: str, data: bytes, headers: dict[str, str] | None) -> Event:
    h = headers or {}
    slot, created, key = (h.get("Tf-Meta") or "0 0 ").split(" ", 2)
    return Event(
        id=h.get("Tf-Event-Id") or h.get("Nats-Msg-Id", ""),
        topic=topic,
        key=unquote(key),
        slot=int(slot),
        payload=bytes(data),
        created_at=float(created),
        headers={k[len(_APP) :]: v for k, v in h.items() if k.startswith(_APP)},
    )


class NatsStreams(StreamBackend):
    """Topics as JetStream streams on the server at `url` (`nats://host:port`)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 3.0,
        publish_timeout_s: float = 5.0,
        handler_timeout_s: float = 30.0,
        fetch_wait_s: float = 1.0,
        **_: object,
    ) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.handler_timeout_s = handler_timeout_s
        self.fetch_wait_s = fetch_wait_s
        self.client: NatsClient | None = None  # the shared connection, while started
        self._nc: Any = None
        self._js: Any = None
        self._stops: set[Callable[[], Awaitable[None]]] = set()

    async def start(self) -> None:
        if self.client is not None:
            return
        # Bounded (2 x connect_timeout_s); BrokerUnavailable when the server is not there.
        client = await nats_clients.acquire(self.url, connect_timeout_s=self.connect_timeout_s)
        self.client, self._nc = client, client.nc
        self._js = client.nc.jetstream(timeout=self.publish_timeout_s)

    async def ping(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise BrokerUnavailable(self.safe_url, "not connected (reconnecting)")
        try:
            await nc.flush(timeout=self.connect_timeout_s)  # a PING/PONG round trip
        except (*_BROKER_ERRORS, nats.errors.FlushTimeoutError) as exc:
            raise BrokerUnavailable(self.safe_url, f"no answer to a ping: {exc!r}") from exc

    async def close(self) -> None:
        """Stop this backend's consumers and release the shared connection (the last
        holder drains and closes it)."""
        for stop in list(self._stops):
            await stop()
        client, self.client, self._nc, self._js = self.client, None, None, None
        if client is not None:
            await nats_clients.release(client)

    def _jetstream(self) -> Any:
        if self._js is None:
            raise BrokerUnavailable(self.safe_url, "not connected: call start() first")
        return self._js

    async def ensure_topic(self, spec: TopicSpec) -> None:
        js = self._jetstream()
        stream = api.StreamConfig(
            name=stream_name(spec.name),
            subjects=[f"tf.{spec.name}.*"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=spec.max_age_s,
            max_bytes=spec.max_bytes,
            max_msg_size=spec.max_event_bytes + 4096,
            # JetStream refuses a duplicate window longer than max_age.
            duplicate_window=min(spec.duplicate_window_s, spec.max_age_s),
            description=f"tenfold topic {spec.name}; partitions={spec.partitions}",
        )
        dlq = api.StreamConfig(
            name=dlq_stream_name(spec.name),
            subjects=[f"tfdlq.{spec.name}.*"],
            storage=api.StorageType.FILE,
            max_age=max(spec.max_age_s, 14 * 24 * 3600.0),
        )
        try:
            existing = await js.stream_info(stream.name)
        except nats.js.errors.NotFoundError:
            existing = None
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(
                self.safe_url, f"cannot read stream {stream.name}: {exc!r}"
            ) from exc
        if existing is not None:
            desc = existing.config.description or ""
            had = (
                desc.rsplit("partitions=", 1)[1] if "partitions=" in desc else str(spec.partitions)
            )
            if had != str(spec.partitions):
                raise TopicError(
                    f"topic {spec.name} has {had} partitions, asked for {spec.partitions}: "
                    "changing the count would reorder keys; create a new topic"
                )
        for config in (stream, dlq):
            try:
                try:
                    await js.add_stream(config)
                except nats.js.errors.BadRequestError:
                    await js.update_stream(config)  # exists with other limits: take ours
            except _BROKER_ERRORS as exc:
                raise BrokerUnavailable(
                    self.safe_url, f"cannot create stream {config.name}: {exc!r}"
                ) from exc

    async def publish(self, spec: TopicSpec, events: list[Event]) -> None:
        js = self._jetstream()
        futures: list[asyncio.Future[Any]] = []
        try:
            for e in events:
                futures.append(
                    await js.publish_async(
                        f"tf.{spec.name}.{spec.partition_of(e.slot)}",
                        e.payload,
                        headers=_headers(e),
                    )
                )
            async with asyncio.timeout(self.publish_timeout_s):
                acks = await asyncio.gather(*futures)
        except _BROKER_ERRORS as exc:
            # Unfinished futures hold slots of nats-py's bounded pending-publish set.
            for future in futures:
                future.cancel()
            raise BrokerUnavailable(
                self.safe_url, f"publish to {spec.name} failed: {exc!r}"
            ) from exc
        for ack in acks:
            if getattr(ack, "stream", None) != stream_name(spec.name):
                raise BrokerUnavailable(self.safe_url, f"unexpected ack {ack!r} for {spec.name}")

    async def consume(
        self,
        spec: TopicSpec,
        group: str,
        handler: Handler,
        policy: RetryPolicy,
        start: StartPosition,
    ) -> Callable[[], Awaitable[None]]:
        subs = [await self._subscribe(spec, group, p, start) for p in range(spec.partitions)]
        stopping = asyncio.Event()
        tasks = [
            asyncio.create_task(self._work(spec, group, p, sub, handler, policy, stopping))
            for p, sub in enumerate(subs)
        ]

        async def stop() -> None:
            self._stops.discard(stop)
            stopping.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sub in subs:  # the connection is shared: leave nothing of ours on it
                with contextlib.suppress(*_BROKER_ERRORS):
                    await sub.unsubscribe()

        self._stops.add(stop)
        return stop

    def _consumer_config(self, spec: TopicSpec, group: str, p: int, start: StartPosition) -> Any:
        policy = api.DeliverPolicy.ALL
        extra: dict[str, Any] = {}
        if start.sequence is not None:
            policy, extra = api.DeliverPolicy.BY_START_SEQUENCE, {"opt_start_seq": start.sequence}
        elif start.time_s is not None:
            when = dt.datetime.fromtimestamp(start.time_s, dt.UTC)
            policy = api.DeliverPolicy.BY_START_TIME
            extra = {"opt_start_time": when.isoformat().replace("+00:00", "Z")}
        elif not start.everything:
            policy = api.DeliverPolicy.NEW
        return api.ConsumerConfig(
            durable_name=f"{group}_p{p}",
            deliver_policy=policy,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.handler_timeout_s + 5.0,
            max_ack_pending=1,
            max_deliver=-1,
            filter_subject=f"tf.{spec.name}.{p}",
            **extra,
        )

    async def _subscribe(self, spec: TopicSpec, group: str, p: int, start: StartPosition) -> Any:
        js = self._jetstream()
        try:
            return await js.pull_subscribe(
                f"tf.{spec.name}.{p}",
                durable=f"{group}_p{p}",
                stream=stream_name(spec.name),
                config=self._consumer_config(spec, group, p, start),
            )
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(
                self.safe_url, f"cannot subscribe {group} to {spec.name}[{p}]: {exc!r}"
            ) from exc

    async def _work(
        self,
        spec: TopicSpec,
        group: str,
        p: int,
        sub: Any,
        handler: Handler,
        policy: RetryPolicy,
        stopping: asyncio.Event,
    ) -> None:
        backoff = Backoff(0.05, 5.0)
        while not stopping.is_set():
            try:
                msgs = await sub.fetch(1, timeout=self.fetch_wait_s)
            except nats.errors.TimeoutError:
                continue
            except _BROKER_ERRORS as exc:
                delay = backoff.next_s()
                log.warning(
                    "%s/%s[%d]: fetch failed (%r); retrying in %.2fs",
                    spec.name,
                    group,
                    p,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            for msg in msgs:
                await self._handle(spec, group, p, msg, handler, policy)

    async def _handle(
        self, spec: TopicSpec, group: str, p: int, msg: Any, handler: Handler, policy: RetryPolicy
    ) -> None:
        meta = msg.metadata
        event = _event(spec.name, msg.data, msg.headers)
        delivery = Delivery(event, int(meta.num_delivered), p, int(meta.sequence.stream))
        try:
            outcome = await deliver(handler, delivery, policy, group, self.handler_timeout_s)
        except asyncio.CancelledError:
            # Stopping mid-handler: hand the event back now instead of after ack_wait.
            with contextlib.suppress(*_BROKER_ERRORS):
                await asyncio.shield(msg.nak())
            raise
        try:
            if outcome.action == "retry":
                await msg.nak(delay=outcome.delay_s)
                return
            if outcome.action == "dead":
                headers = {
                    **_headers(event),
                    "Tf-Error": outcome.error[:2000],
                    "Tf-Attempts": str(delivery.attempt),
                    "Tf-Group": group,
                    "Tf-Failed-At": repr(time.time()),
                    "Tf-Sequence": str(delivery.sequence),
                }
                # Its own dedup id: a redelivery after a lost ack does not dead-letter twice.
                headers["Nats-Msg-Id"] = f"{event.id}.dlq.{group}"
                headers["Tf-Event-Id"] = event.id
                await self._jetstream().publish(
                    f"tfdlq.{spec.name}.{group}",
                    event.payload,
                    headers=headers,
                    stream=dlq_stream_name(spec.name),
                )
            await msg.ack()
        except _BROKER_ERRORS as exc:
            # Not acked: the broker redelivers after ack_wait; an inbox makes that harmless.
            log.warning(
                "%s/%s[%d]: ack failed (%r); the event will be redelivered",
                spec.name,
                group,
                p,
                exc,
            )

    async def reset_group(self, spec: TopicSpec, group: str, start: StartPosition) -> None:
        js = self._jetstream()
        for p in range(spec.partitions):
            try:
                await js.delete_consumer(stream_name(spec.name), f"{group}_p{p}")
            except nats.js.errors.NotFoundError:
                pass
            except _BROKER_ERRORS as exc:
                raise BrokerUnavailable(self.safe_url, f"cannot reset {group}: {exc!r}") from exc
            try:
                await js.add_consumer(
                    stream_name(spec.name), self._consumer_config(spec, group, p, start)
                )
            except _BROKER_ERRORS as exc:
                raise BrokerUnavailable(self.safe_url, f"cannot reset {group}: {exc!r}") from exc

    async def topic_status(self, spec: TopicSpec) -> TopicStatus:
        js = self._jetstream()
        try:
            info = await js.stream_info(stream_name(spec.name))
            dlq = await js.stream_info(dlq_stream_name(spec.name))
        except nats.js.errors.NotFoundError:
            raise TopicError(f"topic {spec.name} has no stream on {self.safe_url}") from None
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(self.safe_url, repr(exc)) from exc
        return TopicStatus(
            spec.name,
            info.state.messages,
            info.state.bytes,
            info.state.last_seq,
            dlq.state.messages,
        )

    async def group_status(self, spec: TopicSpec, group: str) -> GroupStatus:
        js = self._jetstream()
        lag = in_flight = 0
        try:
            for p in range(spec.partitions):
                info = await js.consumer_info(stream_name(spec.name), f"{group}_p{p}")
                lag += info.num_pending + info.num_ack_pending
                in_flight += info.num_ack_pending
        except nats.js.errors.NotFoundError:
            raise TopicError(f"no consumer group {group!r} on topic {spec.name}") from None
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(self.safe_url, repr(exc)) from exc
        return GroupStatus(spec.name, group, lag, in_flight)

    async def topics(self) -> list[TopicSpec]:
        js = self._jetstream()
        found = []
        try:
            for info in await js.streams_info():
                desc = info.config.description or ""
                if not info.config.name.startswith("TF_") or "partitions=" not in desc:
                    continue
                name = desc.removeprefix("tenfold topic ").split(";", 1)[0]
                partitions = int(desc.rsplit("partitions=", 1)[1])
                found.append(
                    TopicSpec(
                        name,
                        partitions=partitions,
                        max_age_s=info.config.max_age or 7 * 24 * 3600.0,
                        max_bytes=info.config.max_bytes or -1,
                    )
                )
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(self.safe_url, repr(exc)) from exc
        return sorted(found, key=lambda t: t.name)

    async def groups(self, spec: TopicSpec) -> list[str]:
        js = self._jetstream()
        try:
            infos = await js.consumers_info(stream_name(spec.name))
        except nats.js.errors.NotFoundError:
            return []
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(self.safe_url, repr(exc)) from exc
        return sorted({c.name.rsplit("_p", 1)[0] for c in infos if c.name and "_p" in c.name})

    async def dead_letters(self, spec: TopicSpec, limit: int = 100) -> list[DeadLetter]:
        js = self._jetstream()
        out: list[DeadLetter] = []
        seq = 1
        try:
            while len(out) < limit:
                try:
                    # next_by_subj needs a subject; without one the server looks up `seq`
                    # exactly, and the first dropped letter would hide every later one.
                    raw = await js.get_msg(
                        dlq_stream_name(spec.name),
                        seq=seq,
                        subject=f"tfdlq.{spec.name}.*",
                        next=True,
                    )
                except nats.js.errors.NotFoundError:
                    break
                h = raw.headers or {}
                out.append(
                    DeadLetter(
                        raw.seq,
                        _event(spec.name, raw.data or b"", h),
                        h.get("Tf-Group", ""),
                        h.get("Tf-Error", ""),
                        int(h.get("Tf-Attempts", "0")),
                        float(h.get("Tf-Failed-At", "0")),
                    )
                )
                seq = raw.seq + 1
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(self.safe_url, repr(exc)) from exc
        return out

    async def drop_dead_letter(self, spec: TopicSpec, sequence: int) -> bool:
        try:
            return bool(await self._jetstream().delete_msg(dlq_stream_name(spec.name), sequence))
        except nats.js.errors.NotFoundError:
            return False
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10057:  # JSStreamMsgDeleteFailed: no such (or a dropped) letter
                return False
            raise BrokerUnavailable(self.safe_url, repr(exc)) from exc
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(self.safe_url, repr(exc)) from exc
