"""Writing to and reading from the transactional outbox of a shard.

`emit` adds one row in the caller's transaction: the state change and its
event commit together or not at all (no dual write). Serialisation and the
size check happen here, inside that transaction, so a bad payload fails the
caller's write instead of being discovered by the relay.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from tenfold.data.base import Connection, Record
from tenfold.errors import EventError, PayloadError
from tenfold.events.base import Event, TopicSpec
from tenfold.keyspace import Key, slot_of

__all__ = ["emit", "encode_payload", "event_of_row", "key_text", "new_event_id"]

_INSERT = (
    "INSERT INTO tenfold_outbox (event_id, topic, event_key, slot, payload, headers, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 token, as NATS wants
PENDING = (
    "SELECT seq, event_id, topic, event_key, slot, payload, headers, created_at "
    "FROM tenfold_outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1"
)


def new_event_id() -> str:
    """A unique, roughly time-ordered id: 48-bit ms time then 80 random bits (like UUIDv7)."""
    ms = time.time_ns() // 1_000_000
    return f"{ms:012x}{os.urandom(10).hex()}"


def key_text(key: Key) -> str:
    """The key as text for the outbox and headers (bytes as hex)."""
    if isinstance(key, bytes):
        return key.hex()
    if isinstance(key, uuid.UUID):
        return str(key)
    return str(key)


def encode_payload(topic: str, payload: Any) -> bytes:
    """JSON bytes of `payload` (orjson: dicts, lists, dataclasses, datetimes, UUIDs, numpy)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    try:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise PayloadError(topic, f"the payload cannot be serialised to JSON ({exc})") from None


async def emit(
    conn: Connection,
    spec: TopicSpec,
    key: Key,
    payload: Any,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Write an event to the outbox of `conn`'s shard, in its open transaction.

    Returns the event id. Raises `PayloadError` (unserialisable or too large)
    and `EventError` (no open transaction) before anything is written.
    """
    if not conn.in_transaction:
        raise EventError(
            f"emit to {spec.name} needs an open transaction so the event commits with the "
            "state change: wrap it in `async with conn.transaction():`"
        )
    slot = slot_of(key)
    body = encode_payload(spec.name, payload)
    for name, value in (headers or {}).items():
        # Checked here, not by the broker: a header NATS refuses would stall the relay.
        if not (isinstance(name, str) and _HEADER_NAME.fullmatch(name)) or not (
            isinstance(value, str) and "\r" not in value and "\n" not in value
        ):
            raise PayloadError(
                spec.name,
                f"header {name!r}: {value!r} is invalid (names are letters, digits and "
                "!#$%&'*+-.^_`|~; values are text without line breaks)",
            )
    header_text = orjson.dumps(dict(headers)).decode() if headers else None
    size = len(body) + (len(header_text) if header_text else 0)
    if size > spec.max_event_bytes:
        raise PayloadError(
            spec.name,
            f"{size} bytes exceeds the topic's limit of {spec.max_event_bytes} bytes "
            "(store large blobs elsewhere and send a reference)",
        )
    event_id = new_event_id()
    await conn.execute(
        _INSERT, event_id, spec.name, key_text(key), slot, body, header_text, time.time()
    )
    return event_id


def event_of_row(row: Record) -> Event:
    headers = orjson.loads(row[6]) if row[6] else {}
    return Event(
        id=row[1],
        topic=row[2],
        key=row[3],
        slot=int(row[4]),
        payload=bytes(row[5]),
        created_at=float(row[7]),
        headers=headers,
    )
