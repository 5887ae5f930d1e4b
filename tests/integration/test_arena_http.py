"""arena's behaviour over HTTP: accounts, rooms, messages, wallet, leaderboard, bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tenfold.gateway.idempotency import KEY_PATTERN
from tenfold.ids import slot_of_id
from tests.integration.arena_support import (
    Arena,
    assert_problem,
    running_arena,
    sqlite_settings,
)
from tests.integration.support import wait_until


@pytest.fixture
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    async with running_arena(sqlite_settings(tmp_path / "arena")) as a:
        yield a


@pytest.fixture
async def both(make_settings: Callable[..., Any]) -> AsyncIterator[Arena]:
    """arena on the parametrised backend (sqlite and postgres)."""
    async with running_arena(make_settings(shards=2)) as a:
        yield a


# -- accounts ---------------------------------------------------------------


async def test_register_login_and_duplicates(both: Arena) -> None:
    r = await both.register("alice")
    assert r.status_code == 201 and r.json()["username"] == "alice"
    assert r.json()["id"].isdigit()
    body = assert_problem(await both.register("alice"), 409)
    assert "alice" in body["detail"]
    assert_problem(await both.register("ALICE"), 409)  # names are case-insensitive
    r = await both.login("alice")
    assert r.status_code == 200
    assert r.json()["access_token"] and r.json()["refresh_token"]
    wrong = assert_problem(await both.login("alice", "not the password"), 401)
    unknown = assert_problem(await both.login("nobody_here", "not the password"), 401)
    assert wrong["detail"] == unknown["detail"]
    assert wrong["type"] == unknown["type"]


# -- rooms --------------------------------------------------------------------


async def _mine(arena: Arena, user: Any) -> set[str]:
    r = await arena.client.get("/rooms/mine", headers=user.headers)
    assert r.status_code == 200, r.text
    return {item["id"] for item in r.json()["items"]}


async def test_rooms_create_join_leave_mine(both: Arena) -> None:
    alice = await both.signup("alice")
    bob = await both.signup("bob")
    r = await both.client.post("/rooms", json={"name": "lobby"}, headers=alice.headers)
    assert r.status_code == 201, r.text
    room = r.json()
    assert room["owner_id"] == alice.id and room["name"] == "lobby"
    await wait_until(lambda: _has(both, alice, room["id"]), what="alice's rooms list the room")
    assert room["id"] not in await _mine(both, bob)

    r = await both.client.post(f"/rooms/{room['id']}/join", headers=bob.headers)
    assert r.status_code == 200 and r.json()["id"] == room["id"]
    r = await both.client.post(f"/rooms/{room['id']}/join", headers=bob.headers)
    assert r.status_code == 200  # joining twice is harmless
    await wait_until(lambda: _has(both, bob, room["id"]), what="bob's rooms list the room")

    r = await both.client.post(f"/rooms/{room['id']}/leave", headers=bob.headers)
    assert r.status_code == 204
    await wait_until(lambda: _lacks(both, bob, room["id"]), what="bob's rooms drop the room")
    r = await both.client.post(
        f"/rooms/{room['id']}/messages", json={"body": "hi"}, headers=bob.headers
    )
    assert_problem(r, 403)
    assert_problem(await both.client.post(f"/rooms/{room['id']}/leave", headers=bob.headers), 403)


async def _has(arena: Arena, user: Any, room_id: str) -> bool:
    return room_id in await _mine(arena, user)


async def _lacks(arena: Arena, user: Any, room_id: str) -> bool:
    return room_id not in await _mine(arena, user)


async def test_only_members_read_and_post(arena: Arena) -> None:
    alice = await arena.signup("alice")
    eve = await arena.signup("eve")
    room = (
        await arena.client.post("/rooms", json={"name": "secret"}, headers=alice.headers)
    ).json()
    url = f"/rooms/{room['id']}/messages"
    r = await arena.client.post(url, json={"body": "for members"}, headers=alice.headers)
    assert r.status_code == 201
    # a message id routes to its room's shard, like the room id
    assert slot_of_id(int(r.json()["id"])) == slot_of_id(int(room["id"]))
    assert_problem(await arena.client.get(url, headers=eve.headers), 403)
    assert_problem(await arena.client.post(url, json={"body": "x"}, headers=eve.headers), 403)
    r = await arena.client.get(url, headers=alice.headers)
    assert [m["body"] for m in r.json()["items"]] == ["for members"]


BAD_ROOMS = ["123456789", "abc", "-1", "1.5", "99999999999999999999", "9223372036854775808"]


async def test_unknown_or_malformed_room_is_404(arena: Arena) -> None:
    alice = await arena.signup("alice")
    for method, path, body in (
        case
        for room_id in BAD_ROOMS
        for case in (
            ("GET", f"/rooms/{room_id}/messages", None),
            ("POST", f"/rooms/{room_id}/messages", {"body": "x"}),
            ("POST", f"/rooms/{room_id}/join", None),
            ("POST", f"/rooms/{room_id}/leave", None),
        )
    ):
        r = await arena.client.request(method, path, json=body, headers=alice.headers)
        assert_problem(r, 404)


async def test_idempotent_message_send(arena: Arena) -> None:
    both = arena
    alice = await both.signup("alice")
    room = (await both.client.post("/rooms", json={"name": "r"}, headers=alice.headers)).json()
    url = f"/rooms/{room['id']}/messages"
    h = {**alice.headers, "Idempotency-Key": "msg-1"}
    first = await both.client.post(url, json={"body": "hello"}, headers=h)
    again = await both.client.post(url, json={"body": "hello"}, headers=h)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert_problem(await both.client.post(url, json={"body": "changed"}, headers=h), 422)
    page = (await both.client.get(url, headers=alice.headers)).json()
    assert [m["id"] for m in page["items"]] == [first.json()["id"]]
    # without a key, the same body twice is two messages
    for _ in range(2):
        assert (
            await both.client.post(url, json={"body": "hello"}, headers=alice.headers)
        ).status_code == 201
    page = (await both.client.get(url, headers=alice.headers)).json()
    assert len(page["items"]) == 3


async def test_cursor_pagination_over_120_messages(arena: Arena) -> None:
    alice = await arena.signup("alice")
    room = (await arena.client.post("/rooms", json={"name": "r"}, headers=alice.headers)).json()
    url = f"/rooms/{room['id']}/messages"
    sent = []
    for i in range(120):
        r = await arena.client.post(url, json={"body": f"m{i}"}, headers=alice.headers)
        assert r.status_code == 201
        sent.append(r.json()["id"])
    got: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 50}
        if cursor is not None:
            params["before"] = cursor
        r = await arena.client.get(url, params=params, headers=alice.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        got.extend(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    ids = [m["id"] for m in got]
    assert len(ids) == len(set(ids)) == 120
    assert ids == list(reversed(sent))  # newest first, no gaps, no repeats
    assert [m["body"] for m in got] == [f"m{i}" for i in reversed(range(120))]
    assert pages == 3


# -- wallet ---------------------------------------------------------------------


async def test_wallet_is_private(arena: Arena) -> None:
    alice = await arena.signup("alice")
    bob = await arena.signup("bob")
    r = await arena.client.get("/wallet", headers=alice.headers)
    assert r.json() == {"user_id": alice.id, "balance": 1000}
    r = await arena.client.get("/wallet", params={"user_id": bob.id}, headers=alice.headers)
    assert r.json()["user_id"] == alice.id  # a query string cannot pick another wallet
    r = await arena.client.get(f"/wallet/{bob.id}", headers=alice.headers)
    assert r.status_code in (404, 405)
    schema = (await arena.client.get("/openapi.json")).json()
    wallet_paths = {p for p in schema["paths"] if p.startswith("/wallet")}
    assert wallet_paths == {"/wallet", "/wallet/transfers", "/wallet/transfers/{transfer_id}"}
    for op in schema["paths"]["/wallet"].values():
        assert not [p for p in op.get("parameters", []) if p["in"] in ("query", "path")]


BAD_AMOUNTS: list[Any] = [-5, 0, 1.5, "10", "ten", 10**12, 2**63, None, True, [10], {"n": 1}, 1001]


async def test_bad_transfer_amounts_change_nothing(arena: Arena) -> None:
    alice = await arena.signup("alice")
    bob = await arena.signup("bob")
    for amount in BAD_AMOUNTS:
        r = await arena.transfer(alice, "bob", amount)
        assert 400 <= r.status_code < 500, (amount, r.text)
        assert_problem(r, r.status_code)
    assert await arena.balance(alice) == 1000
    assert await arena.balance(bob) == 1000
    r = await arena.client.get("/wallet/transfers/1", headers=alice.headers)
    assert r.status_code == 404


async def test_transfer_to_self_is_422(arena: Arena) -> None:
    alice = await arena.signup("alice")
    assert_problem(await arena.transfer(alice, "alice", 10), 422)
    assert_problem(await arena.transfer(alice, "ALICE", 10), 422)
    assert await arena.balance(alice) == 1000


async def test_transfer_needs_an_idempotency_key(arena: Arena) -> None:
    alice = await arena.signup("alice")
    await arena.signup("bob")
    r = await arena.client.post(
        "/wallet/transfers", json={"to": "bob", "amount": 5}, headers=alice.headers
    )
    assert_problem(r, 422)
    assert await arena.balance(alice) == 1000


async def _status(arena: Arena, user: Any, transfer_id: str) -> str:
    r = await arena.client.get(f"/wallet/transfers/{transfer_id}", headers=user.headers)
    assert r.status_code == 200, r.text
    return str(r.json()["status"])


async def test_transfer_settles_and_leaderboard_follows(both: Arena) -> None:
    alice = await both.signup("alice")
    bob = await both.signup("bob")
    r = await both.transfer(alice, "bob", 300, key="pay-1")
    assert r.status_code == 202 and r.json()["status"] == "pending"
    tid = r.json()["id"]
    replay = await both.transfer(alice, "bob", 300, key="pay-1")
    assert replay.status_code in (200, 202) and replay.json()["id"] == tid
    assert_problem(await both.transfer(alice, "bob", 301, key="pay-1"), 422)
    await wait_until(lambda: _is(both, alice, tid, "completed"), what="transfer completed")
    assert await both.balance(alice) == 700
    assert await both.balance(bob) == 1300

    async def board() -> bool:
        r = await both.client.get("/leaderboard")
        points = {row["username"]: row["points"] for row in r.json()["items"]}
        return points == {"alice": 700, "bob": 1300}

    await wait_until(board, timeout_s=15, what="leaderboard shows the transfer")
    r = await both.client.get("/leaderboard", params={"limit": 1})
    assert r.json()["items"] == [{"username": "bob", "points": 1300}]


async def _is(arena: Arena, user: Any, tid: str, status: str) -> bool:
    return await _status(arena, user, tid) == status


async def test_transfer_to_unknown_user_is_refunded(both: Arena) -> None:
    alice = await both.signup("alice")
    r = await both.transfer(alice, "ghost_user", 250)
    assert r.status_code == 202
    tid = r.json()["id"]
    await wait_until(lambda: _is(both, alice, tid, "refunded"), what="transfer refunded")
    r = await both.client.get(f"/wallet/transfers/{tid}", headers=alice.headers)
    assert r.json()["reason"]
    assert await both.balance(alice) == 1000


async def test_someone_elses_transfer_is_404(arena: Arena) -> None:
    alice = await arena.signup("alice")
    bob = await arena.signup("bob")
    tid = (await arena.transfer(alice, "bob", 10)).json()["id"]
    assert (
        await arena.client.get(f"/wallet/transfers/{tid}", headers=alice.headers)
    ).status_code == 200
    assert_problem(await arena.client.get(f"/wallet/transfers/{tid}", headers=bob.headers), 404)
    for bad in ("abc", "-1", "1" * 25, "123"):
        assert_problem(
            await arena.client.get(f"/wallet/transfers/{bad}", headers=alice.headers), 404
        )


async def test_insufficient_funds_is_409(arena: Arena) -> None:
    alice = await arena.signup("alice")
    await arena.signup("bob")
    assert (await arena.transfer(alice, "bob", 600)).status_code == 202
    assert_problem(await arena.transfer(alice, "bob", 600), 409)
    assert await arena.balance(alice) == 400


async def test_concurrent_spends_never_overdraw(arena: Arena) -> None:
    alice = await arena.signup("alice")
    await arena.signup("bob")
    results = await asyncio.gather(*(arena.transfer(alice, "bob", 300) for _ in range(6)))
    accepted = [r for r in results if r.status_code == 202]
    assert len(accepted) == 3, [r.status_code for r in results]
    assert all(r.status_code in (202, 409) for r in results)
    assert await arena.balance(alice) == 100


# -- bad input never 5xx ------------------------------------------------------

HUGE = "x" * 60_000


BAD_BODIES: list[tuple[str, bytes]] = [
    ("/auth/register", b"{not json"),
    ("/auth/register", b""),
    ("/auth/register", b"[]"),
    ("/auth/register", b"null"),
    ("/auth/register", b'"string"'),
    ("/auth/register", b'{"username": 5, "password": 7}'),
    ("/auth/register", b'{"username": "abc"}'),
    ("/auth/register", b'{"username": "abc", "password": "longenough", "admin": true}'),
    ("/auth/register", f'{{"username": "{HUGE}", "password": "longenough"}}'.encode()),
    ("/auth/register", b'{"username": "ab\\u0000c", "password": "longenough"}'),
    ("/auth/login", b'{"username": ["a"], "password": {"x": 1}}'),
    ("/auth/login", f'{{"username": "abc", "password": "{HUGE}"}}'.encode()),
    ("/auth/refresh", b'{"refresh_token": 12}'),
    ("/auth/refresh", f'{{"refresh_token": "{HUGE}"}}'.encode()),
    ("/auth/logout", b'{"refresh_token": null}'),
    ("/rooms", b'{"name": ""}'),
    ("/rooms", b'{"name": "   "}'),
    ("/rooms", f'{{"name": "{HUGE}"}}'.encode()),
    ("/rooms", b'{"name": "ok", "owner_id": 1}'),
    ("/rooms", b'{"name": 1e400}'),
    ("/wallet/transfers", b'{"to": "bob", "amount": 1e400}'),
    ("/wallet/transfers", b'{"to": "bob", "amount": 99999999999999999999999999}'),
    ("/wallet/transfers", b'{"to": "bob"}'),
    ("/wallet/transfers", b'{"to": "", "amount": 1}'),
    ("/wallet/transfers", b'{"amount": 1, "to": "bob", "memo": "x"}'),
    ("/wallet/transfers", b"\xff\xfe garbage"),
    ("/wallet/transfers", b'{"to": "bob", "amount": 1}' * 2),
]


async def test_bad_json_bodies_are_4xx(arena: Arena) -> None:
    alice = await arena.signup("alice")
    await arena.signup("bob")
    headers = {**alice.headers, "content-type": "application/json", "Idempotency-Key": "k1"}
    for path, body in BAD_BODIES:
        r = await arena.client.post(path, content=body, headers=headers)
        assert 400 <= r.status_code < 500, (path, body[:80], r.status_code, r.text)
        assert_problem(r, r.status_code)
    assert await arena.balance(alice) == 1000
    assert (await arena.client.get("/rooms/mine", headers=alice.headers)).json()["items"] == []


async def test_bad_headers_and_params_are_4xx(arena: Arena) -> None:
    alice = await arena.signup("alice")
    room = (await arena.client.post("/rooms", json={"name": "r"}, headers=alice.headers)).json()
    url = f"/rooms/{room['id']}/messages"
    cases = [
        ("GET", url, {"params": {"limit": "lots"}}),
        ("GET", url, {"params": {"limit": 0}}),
        ("GET", url, {"params": {"limit": 10**6}}),
        ("GET", url, {"params": {"before": "abc"}}),
        ("GET", url, {"params": {"before": "9" * 40}}),
        ("GET", "/leaderboard", {"params": {"limit": -1}}),
        ("GET", "/leaderboard", {"params": {"limit": "x"}}),
        ("POST", url, {"json": {"body": "x"}, "headers": {"Idempotency-Key": "bad key!"}}),
        ("POST", url, {"json": {"body": "x"}, "headers": {"Idempotency-Key": "k" * 65}}),
        ("POST", url, {"json": {"body": ""}}),
        ("POST", url, {"json": {"body": "y" * 2001}}),
        ("POST", url, {"content": b"body=x", "headers": {"content-type": "text/plain"}}),
    ]
    for method, path, kw in cases:
        headers = {**alice.headers, **kw.pop("headers", {})}
        r = await arena.client.request(method, path, headers=headers, **kw)
        assert 400 <= r.status_code < 500, (method, path, kw, r.status_code, r.text)
        assert_problem(r, r.status_code)
    r = await arena.client.get(url, params={"before": "9" * 19}, headers=alice.headers)
    assert r.status_code == 200  # a large but valid cursor


async def test_oversize_body_is_413(arena: Arena) -> None:
    alice = await arena.signup("alice")
    big = b'{"name": "' + b"x" * 100_000 + b'"}'
    r = await arena.client.post(
        "/rooms", content=big, headers={**alice.headers, "content-type": "application/json"}
    )
    assert_problem(r, 413)


async def test_arena_answers_under_a_second(arena: Arena) -> None:
    # a guard against an accidental default (OWASP) password profile in these tests
    started = time.monotonic()
    await arena.signup("speedy")
    assert time.monotonic() - started < 1.0


async def test_openapi_documents_the_idempotency_key_header(arena: Arena) -> None:
    schema = (await arena.client.get("/openapi.json")).json()
    send = schema["paths"]["/rooms/{room_id}/messages"]["post"]["parameters"]
    transfer = schema["paths"]["/wallet/transfers"]["post"]["parameters"]
    for params, required in ((send, False), (transfer, True)):
        [header] = [p for p in params if p["in"] == "header"]
        assert header["name"] == "Idempotency-Key" and header["required"] is required
        assert header["schema"]["pattern"] == KEY_PATTERN
