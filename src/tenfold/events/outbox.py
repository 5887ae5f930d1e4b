"""Writing to and reading from the transactional outbox of a shard.

`emit` adds one row in the caller's transaction: the state change and its
event commit together or not at all (no dual write). Serialisation and the
size check happen here, inside that transaction, so a bad payload fails the
caller's write instead of being discovered by the relay.
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from tenfold.data.base import Connection, Record
from tenfold.errors import EventError, PayloadError
from tenfold.events.base import Event, TopicSpec
from tenfold.keyspace import BYTES_LIKE, Key, slot_of

__all__ = [
    "emit",
    "encode_payload",
    "event_of_row",
    "key_text",
    "new_event_id",
    "outbox_row",
]

_INSERT = (
    "INSERT INTO tenfold_outbox (event_id, topic, event_key, slot, payload, headers, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
_random = random.Random()  # seeded from os.urandom; re-seeded in forked children (below)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_random.seed)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 token, as NATS wants
# The columns `event_of_row` reads, in its order.
ROW = (
    "SELECT seq, event_id, topic, event_key, slot, payload, headers, created_at FROM tenfold_outbox"
)
PENDING = f"{ROW} WHERE published_at IS NULL ORDER BY seq LIMIT $1"


def new_event_id() -> str:
    """A unique, roughly time-ordered id: 48-bit ms time then 80 random bits (like UUIDv7)."""
    # getrandbits, not os.urandom: ids need uniqueness, not secrecy, and a
    # syscall per event was a visible share of a send-message request.
    return f"{time.time_ns() // 1_000_000:012x}{_random.getrandbits(80):020x}"


def key_text(key: Key) -> str:
    """The key as text for the outbox and headers (bytes as hex)."""
    if isinstance(key, bytes):
        return key.hex()
    if isinstance(key, uuid.UUID):
        return str(key)
    return str(key)


def encode_payload(topic: str, payload: Any) -> bytes:
    """JSON bytes of `payload` (orjson: dicts, lists, dataclasses, datetimes, UUIDs, numpy)."""
    if isinstance(payload, BYTES_LIKE):
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
    row = outbox_row(spec, key, payload, headers)
    await conn.execute(_INSERT, *row.values())
    return str(row["event_id"])


def outbox_row(
    spec: TopicSpec, key: Key, payload: Any, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The outbox row of an event (columns in `_INSERT`'s order), checked and serialised.

    Raises `PayloadError` (unserialisable or too large, or a bad header).
    """
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
    return {
        "event_id": new_event_id(),
        "topic": spec.name,
        "event_key": key_text(key),
        "slot": slot_of(key),
        "payload": body,
        "headers": header_text,
        "created_at": time.time(),
    }


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
