"""The v1 wire protocol of `/ws` (docs/realtime.md): parse client frames, build server frames.

Client frames are JSON objects of at most `max_bytes`; `parse` raises
`Malformed` (close 4000) for what is not a bounded JSON object and `BadFrame`
(an error frame, the connection stays) for an object that is not a valid
request. Server frames are built as bytes; a published `msg` frame is encoded
once and shared by every subscriber (and every node).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "OPS",
    "BadFrame",
    "Malformed",
    "Request",
    "check_channel",
    "error_frame",
    "escape_channel",
    "frame",
    "is_presence_frame",
    "msg_frame",
    "parse",
    "presence_frame",
]

OPS = frozenset({"auth", "sub", "unsub", "pub", "presence", "ping"})
# Channel names: "room:42", "user:7", "game.lobby-1". Bounded, printable, no spaces.
_CHANNEL = re.compile(r"^[A-Za-z0-9_\-:.@]{1,128}$")
_MAX_REF = 2**53


class Malformed(Exception):
    """Not a JSON object, or over the size bound: the connection closes with 4000."""


class BadFrame(Exception):
    """A JSON object that is not a valid request: answered with an error frame."""

    def __init__(self, code: str, message: str, ref: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


@dataclass(slots=True)
class Request:
    op: str
    ref: int | None
    ch: str = ""
    token: str = ""
    data: bytes = b"null"  # the `data` value re-encoded (compact JSON)
    ephemeral: bool = False
    since: tuple[str, int] | None = None
    join_leave: bool = False  # sub: also receive the channel's join/leave frames


def check_channel(ch: object) -> str:
    """`ch` if it is a valid channel name, else ValueError."""
    if not isinstance(ch, str) or not _CHANNEL.match(ch):
        raise ValueError(f"channel {str(ch)[:40]!r} is invalid: 1-128 of letters, digits and _-:.@")
    return ch


def escape_channel(ch: str) -> str:
    """`ch` as one NATS subject token: '.', ':', '@' and '~' become '~xx' (hex)."""
    out = []
    for c in ch:
        if c in ".:@~":
            out.append(f"~{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def parse(raw: str | bytes, max_bytes: int) -> Request:
    """One client frame → a `Request`.

    Raises:
        Malformed: over `max_bytes`, not JSON, or not an object.
        BadFrame: missing/invalid fields (`bad_request`) or an unknown op (`unknown_op`).
    """
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise Malformed(f"frame of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Malformed(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise Malformed("frame is not a JSON object")
    ref = obj.get("ref")
    if ref is not None and (
        not isinstance(ref, int) or isinstance(ref, bool) or not -_MAX_REF < ref < _MAX_REF
    ):
        raise BadFrame("bad_request", "'ref' must be an integer")
    op = obj.get("op")
    if not isinstance(op, str):
        raise BadFrame("bad_request", "every frame needs a string 'op'", ref)
    if op not in OPS:
        raise BadFrame("unknown_op", f"unknown op {op[:32]!r}; see docs/realtime.md", ref)
    req = Request(op, ref)
    if op == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise BadFrame("bad_request", "'auth' needs a string 'token'", ref)
        req.token = token
        return req
    if op == "ping":
        return req
    try:
        req.ch = check_channel(obj.get("ch"))
    except ValueError as exc:
        raise BadFrame("bad_request", str(exc), ref) from None
    if op == "sub":
        join_leave = obj.get("join_leave", False)
        if not isinstance(join_leave, bool):
            raise BadFrame("bad_request", "'join_leave' must be a boolean", ref)
        req.join_leave = join_leave
        since = obj.get("since")
        if since is not None:
            if (
                not isinstance(since, dict)
                or not isinstance(since.get("epoch"), str)
                or not isinstance(since.get("offset"), int)
                or isinstance(since.get("offset"), bool)
                or since["offset"] < 0
            ):
                raise BadFrame(
                    "bad_request", '\'since\' must be {"epoch": str, "offset": int >= 0}', ref
                )
            req.since = (since["epoch"], since["offset"])
    elif op == "pub":
        if "data" not in obj:
            raise BadFrame("bad_request", "'pub' needs 'data'", ref)
        eph = obj.get("ephemeral", False)
        if not isinstance(eph, bool):
            raise BadFrame("bad_request", "'ephemeral' must be a boolean", ref)
        req.ephemeral = eph
        req.data = orjson.dumps(obj["data"])
    return req


def frame(obj: dict[str, Any]) -> str:
    """A server frame as text."""
    return orjson.dumps(obj).decode()


def error_frame(code: str, message: str, ref: int | None = None) -> str:
    out: dict[str, Any] = {"op": "error", "code": code, "message": message}
    if ref is not None:
        out["ref"] = ref
    return frame(out)


def msg_frame(ch: str, data: bytes, epoch: str | None = None, offset: int | None = None) -> str:
    """A `msg` frame around already-encoded `data`: built once per publish."""
    head = b'{"op":"msg","ch":' + orjson.dumps(ch)
    if offset is None:
        return (head + b',"data":' + data + b',"ephemeral":true}').decode()
    return (
        head
        + b',"epoch":'
        + orjson.dumps(epoch)
        + b',"offset":'
        + str(offset).encode()
        + b',"data":'
        + data
        + b"}"
    ).decode()


def presence_frame(op: str, ch: str, users: list[tuple[str, str]]) -> str:
    """A `join` or `leave` frame listing (user, name) pairs."""
    return frame({"op": op, "ch": ch, "users": [{"user": u, "name": n} for u, n in users]})


def is_presence_frame(text: str) -> bool:
    """Whether a server frame is a `join`/`leave` (only opted-in subscribers get those)."""
    return text.startswith('{"op":"join"') or text.startswith('{"op":"leave"')
