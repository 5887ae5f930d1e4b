"""arena's authorization and limits over HTTP (issue 13): token lifetime, rules that
apply only to the routes they name, login limits per account and per IP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest

from tests.integration.arena_support import (
    SECRET,
    Arena,
    assert_problem,
    running_arena,
    sqlite_settings,
)


@pytest.fixture
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    async with running_arena(sqlite_settings(tmp_path / "arena")) as a:
        yield a


async def test_a_token_with_an_exp_of_2_to_the_80_is_401(arena: Arena) -> None:
    """Signed with the real key, but claiming to live for ever: refused by configuration."""
    user = await arena.signup("alice")
    s = arena.runtime.settings
    now = int(time.time())
    forever = jwt.encode(
        {"iss": s.auth_issuer, "aud": s.auth_audience, "sub": user.id, "iat": now, "exp": 2**80},
        SECRET,
        algorithm="HS256",
        headers={"typ": "at+jwt"},
    )
    r = await arena.client.get("/wallet", headers={"Authorization": f"Bearer {forever}"})
    body = assert_problem(r, 401)
    assert "lifetime exceeds" in body["detail"]
    assert (await arena.client.get("/wallet", headers=user.headers)).status_code == 200


def _limits(**rules: str) -> dict[str, str]:
    # "ip" raised (in the form both the old and the new gateway read) so the
    # generic anonymous bound stays out of what these tests look at
    return {"ip": "1000000/minute burst 100000 per ip", **rules}


async def test_anonymous_browsing_does_not_spend_the_register_rule(tmp_path: Path) -> None:
    """arena's `register` rule is per IP: it used to be charged on every anonymous
    request, so ~200 `GET /leaderboard` calls locked the IP out of register and login."""
    settings = sqlite_settings(tmp_path / "arena", rate_limits=_limits())
    async with running_arena(settings) as arena:
        for _ in range(230):
            r = await arena.client.get("/leaderboard")
            assert r.status_code == 200, r.text
        # the route rule is still in force where it is named
        r = await arena.register("newcomer")
        assert r.status_code == 201, r.text
        assert r.headers["ratelimit-limit"] == "600"
        assert int(r.headers["ratelimit-remaining"]) == 199
        assert (await arena.login("newcomer")).status_code == 200


async def test_route_rules_count_only_their_routes(tmp_path: Path) -> None:
    settings = sqlite_settings(
        tmp_path / "arena",
        rate_limits=_limits(register="3/minute burst 3 per ip on POST /auth/register"),
    )
    async with running_arena(settings) as arena:
        for _ in range(10):
            assert (await arena.client.get("/leaderboard")).status_code == 200
        statuses = [(await arena.register(f"user{i}")).status_code for i in range(5)]
        assert statuses == [201, 201, 201, 429, 429], statuses
        r = await arena.register("user9")
        assert "rate limit 'register' reached" in assert_problem(r, 429)["detail"]
        assert (await arena.client.get("/leaderboard")).status_code == 200


async def test_a_brute_force_on_one_account_locks_neither_the_ip_nor_other_users(
    tmp_path: Path,
) -> None:
    """One client guesses alice's password 220 times; bob, on the same IP (a NAT),
    still logs in, and alice's account refuses even a correct password until it cools."""
    settings = sqlite_settings(tmp_path / "arena", rate_limits=_limits())
    async with running_arena(settings) as arena:
        await arena.signup("alice")
        await arena.signup("bob")
        statuses = [
            (await arena.login("alice", f"wrong-guess-{i}")).status_code for i in range(220)
        ]
        bob = await arena.login("bob")
        assert bob.status_code == 200, bob.text
        assert statuses[:10] == [401] * 10, statuses[:12]
        assert set(statuses[10:]) == {429}, statuses[10:20]
        locked = await arena.login("alice")
        body = assert_problem(locked, 429)
        assert "too many failed logins for this account" in body["detail"]
        assert int(locked.headers["retry-after"]) >= 1


async def test_failed_logins_per_ip_are_bounded_across_accounts(tmp_path: Path) -> None:
    settings = sqlite_settings(
        tmp_path / "arena", rate_limits=_limits(login_ip="3/minute burst 3 per ip")
    )
    async with running_arena(settings) as arena:
        await arena.signup("carol")
        # a successful login costs nothing: the owner is never counted
        for _ in range(5):
            assert (await arena.login("carol")).status_code == 200
        statuses = [(await arena.login(f"nobody{i}", "bad-password")).status_code for i in range(5)]
        assert statuses == [401, 401, 401, 429, 429], statuses
        r = await arena.login("carol")
        assert "from this address" in assert_problem(r, 429)["detail"]
