"""Ids from clients: path segments, channel names and token subjects, checked once.

A tenfold id is a positive 63-bit integer (`tenfold.ids`). Anything else a
client sends where an id belongs (0, a sign, a fraction, 2^63 or more, a
non-ASCII digit such as "²" that `str.isdigit` accepts but `int` refuses) is
refused here, before it reaches the router, where it would be a
`KeyspaceError` or a database overflow: a server error for a client's
mistake.

- `parse_id(text)`: the id, or None; for callers that answer their own way
  (the realtime hub's `forbidden`).
- `room_id(text)`, `transfer_id(text)`: the id, or a 404 problem: an id that
  cannot exist names nothing, like one that does not exist.
- `user_id(principal)`: the caller's id from the token's subject, or a 401
  (invalid token): every arena route reads the caller through it.
"""

from __future__ import annotations

import re

from tenfold.errors import TokenInvalid
from tenfold.gateway import Principal, Problem

__all__ = ["MAX_ID", "parse_id", "room_id", "transfer_id", "user_id"]

MAX_ID = 2**63 - 1
# ASCII digits only: `str.isdigit` also takes "²" and "١", which `int` refuses or reads.
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_id(text: str) -> int | None:
    """`text` as a tenfold id (decimal, 1 to 2^63-1), or None when it cannot be one."""
    if _DIGITS.fullmatch(text) is None:
        return None
    value = int(text)
    return value if 0 < value <= MAX_ID else None


def room_id(text: str) -> int:
    """The room id in a path, or a 404 problem."""
    value = parse_id(text)
    if value is None:
        raise Problem(404, f"no room {text[:32]!r}", slug="no-such-room")
    return value


def transfer_id(text: str) -> int:
    """The transfer id in a path, or a 404 problem."""
    value = parse_id(text)
    if value is None:
        raise Problem(404, "no such transfer", slug="no-such-transfer")
    return value


def user_id(principal: Principal) -> int:
    """The caller's user id: the access token's subject, which arena issues as an id.

    Raises:
        TokenInvalid: (401) the subject is not a tenfold id: a token signed with
            the right key but not one arena issued (or from an older scheme).
    """
    value = parse_id(principal.subject)
    if value is None or str(value) != principal.subject:
        # Canonical digits only: "012" and "12" would be one user under two cache keys.
        raise TokenInvalid("the access token does not name a user; sign in again")
    return value
