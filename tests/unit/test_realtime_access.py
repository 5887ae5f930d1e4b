"""The periodic re-check (`tenfold.realtime.access`): refusals end access, failures do not."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from tenfold.realtime.access import Reauthorizer, revoke_frame, revoked_user


def _conn(user: str, *channels: str) -> Any:
    return SimpleNamespace(
        user=user, principal=SimpleNamespace(subject=user), channels=set(channels)
    )


def test_one_check_per_user_and_channel_refusals_drop_failures_keep() -> None:
    asked: list[tuple[str, str]] = []

    async def authorize(principal: Any, ch: str, action: str) -> bool:
        asked.append((principal.subject, ch))
        if ch == "room:down":
            raise ConnectionError("the app's store is down")
        return ch != "room:left"

    dropped: list[tuple[str, str, str]] = []

    def drop(conn: Any, ch: str, reason: str) -> None:
        conn.channels.discard(ch)
        dropped.append((conn.user, ch, reason))

    a1 = _conn("a", "room:1", "room:left", "room:down")
    a2 = _conn("a", "room:left")  # a second connection of the same user
    b = _conn("b", "room:1")
    recheck = Reauthorizer(authorize, drop, interval_s=30)
    assert asyncio.run(recheck.once((a1, a2, b))) == 2
    assert sorted(asked) == [
        ("a", "room:1"),
        ("a", "room:down"),
        ("a", "room:left"),
        ("b", "room:1"),
    ]
    assert sorted(dropped) == [("a", "room:left", "forbidden")] * 2
    assert a1.channels == {"room:1", "room:down"} and b.channels == {"room:1"}


def test_a_hanging_check_is_bounded_and_keeps_access() -> None:
    async def authorize(principal: Any, ch: str, action: str) -> bool:
        await asyncio.sleep(60)
        return False

    conn = _conn("a", "room:1")
    recheck = Reauthorizer(authorize, lambda *a: None, interval_s=30, check_timeout_s=0.05)
    assert asyncio.run(recheck.once((conn,))) == 0
    assert conn.channels == {"room:1"}


def test_revoke_frames_round_trip_and_nothing_else_is_one() -> None:
    assert revoked_user(revoke_frame("room:1", "42")) == "42"
    for text in ('{"op":"msg","ch":"room:1","data":{"op":"revoke"}}', '{"op":"revoke"', "x"):
        assert revoked_user(text) is None
