"""Access- and refresh-token attacks against arena over HTTP: every one is a 401 problem."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tenfold.gateway.auth import AccessTokens
from tests.integration.arena_support import (
    SECRET,
    Arena,
    User,
    assert_problem,
    running_arena,
    sqlite_settings,
)


@pytest.fixture
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    async with running_arena(sqlite_settings(tmp_path / "arena")) as a:
        yield a


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _minter(arena: Arena, **kw: object) -> AccessTokens:
    s = arena.runtime.settings
    args: dict[str, object] = {"issuer": s.auth_issuer, "audience": s.auth_audience, **kw}
    secret = args.pop("secret", SECRET)
    return AccessTokens(secret, **args)  # type: ignore[arg-type]


async def _wallet(arena: Arena, token: str) -> int:
    r = await arena.client.get("/wallet", headers={"Authorization": f"Bearer {token}"})
    return r.status_code


async def test_a_well_forged_token_is_accepted(arena: Arena) -> None:
    # the control: the attacks below differ from this in one thing only
    user = await arena.signup("alice")
    token = _minter(arena).issue(user.id, name=user.name)
    assert await _wallet(arena, token) == 200
    assert await _wallet(arena, user.access) == 200


def _alg_none(user: User) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "at+jwt"}).encode())
    _, payload, _ = user.access.split(".")
    return f"{header}.{payload}."


def _tampered(user: User, other: User) -> str:
    header, payload, sig = user.access.split(".")
    claims = json.loads(_unb64(payload))
    claims["sub"] = other.id
    claims["name"] = other.name
    return f"{header}.{_b64(json.dumps(claims).encode())}.{sig}"


@pytest.mark.parametrize(
    "attack", ["alg_none", "other_secret", "tampered", "expired", "audience", "issuer", "garbage"]
)
async def test_bad_access_tokens_are_401(arena: Arena, attack: str) -> None:
    user = await arena.signup("alice")
    other = await arena.signup("bob")
    if attack == "alg_none":
        token = _alg_none(user)
    elif attack == "other_secret":
        token = _minter(arena, secret="another-secret-" + "y" * 40).issue(user.id, name=user.name)
    elif attack == "tampered":
        token = _tampered(user, other)
    elif attack == "expired":
        past = time.time() - 3600
        token = _minter(arena, clock=lambda: past).issue(user.id, name=user.name)
    elif attack == "audience":
        token = _minter(arena, audience="someone-else").issue(user.id, name=user.name)
    elif attack == "issuer":
        token = _minter(arena, issuer="evil").issue(user.id, name=user.name)
    else:
        token = "not.a.jwt"
    r = await arena.client.get("/wallet", headers={"Authorization": f"Bearer {token}"})
    body = assert_problem(r, 401)
    assert "www-authenticate" in r.headers
    assert token not in r.text
    # a refused token never acts as the user: posting needs a valid one too
    r = await arena.client.post(
        "/rooms", json={"name": "x"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert_problem(r, 401)
    assert body["detail"]


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer    ", "token abc"])
async def test_malformed_authorization_header_is_401(arena: Arena, header: str) -> None:
    r = await arena.client.get("/wallet", headers={"Authorization": header})
    assert_problem(r, 401)


async def test_no_token_is_401(arena: Arena) -> None:
    assert_problem(await arena.client.get("/wallet"), 401)


async def _refresh(arena: Arena, token: str) -> tuple[int, dict[str, str]]:
    r = await arena.client.post("/auth/refresh", json={"refresh_token": token})
    return r.status_code, r.json()


async def test_refresh_reuse_revokes_the_whole_family(arena: Arena) -> None:
    user = await arena.signup("alice")
    status, first = await _refresh(arena, user.refresh)
    assert status == 200 and first["refresh_token"] != user.refresh
    status, second = await _refresh(arena, first["refresh_token"])
    assert status == 200
    newest = second["refresh_token"]
    # the thief replays an already-rotated token
    r = await arena.client.post("/auth/refresh", json={"refresh_token": user.refresh})
    assert_problem(r, 401)
    # ... and the legitimate newest token of that family is dead too
    r = await arena.client.post("/auth/refresh", json={"refresh_token": newest})
    assert_problem(r, 401)
    # a fresh login starts a new family that works
    r = await arena.login("alice")
    status, _ = await _refresh(arena, r.json()["refresh_token"])
    assert status == 200


async def test_reuse_in_one_family_leaves_other_sessions_alone(arena: Arena) -> None:
    await arena.signup("alice")
    phone = (await arena.login("alice")).json()["refresh_token"]
    laptop = (await arena.login("alice")).json()["refresh_token"]
    status, rotated = await _refresh(arena, phone)
    assert status == 200
    assert (await _refresh(arena, phone))[0] == 401
    assert (await _refresh(arena, rotated["refresh_token"]))[0] == 401
    assert (await _refresh(arena, laptop))[0] == 200


async def test_logout_then_refresh_is_401(arena: Arena) -> None:
    user = await arena.signup("alice")
    r = await arena.client.post("/auth/logout", json={"refresh_token": user.refresh})
    assert r.status_code == 204
    r = await arena.client.post("/auth/refresh", json={"refresh_token": user.refresh})
    assert_problem(r, 401)


@pytest.mark.parametrize("token", ["", "x", "123.abc", "9" * 30 + ".zz", "a" * 256])
async def test_garbage_refresh_tokens_are_4xx(arena: Arena, token: str) -> None:
    r = await arena.client.post("/auth/refresh", json={"refresh_token": token})
    assert r.status_code in (401, 422), r.text
