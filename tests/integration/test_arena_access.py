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
