"""Access tokens live at most `max_lifetime_s`, however far away their `exp` is signed."""

from __future__ import annotations

import time

import jwt
import pytest

from tenfold.config import load_settings
from tenfold.errors import ConfigError, TokenInvalid
from tenfold.gateway.auth import AccessTokens

SECRET = "lifetime-test-secret-" + "x" * 32
ISS, AUD = "tenfold", "tenfold-app"


def _signed(**claims: int) -> str:
    now = int(time.time())
    payload = {"iss": ISS, "aud": AUD, "sub": "42", "iat": now, "nbf": now, "exp": now + 600}
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256", headers={"typ": "at+jwt"})


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 2**80},  # the issue's token: accepted for ever before
        {"exp": int(time.time()) + 7200},  # iat now, two hours: over the one-hour bound
        # iat pushed back to make exp - iat look short is still measured from now
        {"iat": int(time.time()) - 10, "exp": int(time.time()) + 5000},
    ],
)
def test_a_token_living_longer_than_the_bound_is_refused(claims: dict[str, int]) -> None:
    tokens = AccessTokens(SECRET, ISS, AUD, max_lifetime_s=3600)
    with pytest.raises(TokenInvalid) as info:
        tokens.verify(_signed(**claims))
    assert info.value.http_status == 401
    assert "lifetime exceeds the 3600 s allowed" in info.value.reason


def test_tokens_within_the_bound_and_our_own_pass() -> None:
    tokens = AccessTokens(SECRET, ISS, AUD, ttl_s=900, max_lifetime_s=3600)
    assert tokens.verify(_signed(exp=int(time.time()) + 3500)).subject == "42"
    assert tokens.verify(tokens.issue("7")).subject == "7"


def test_the_bound_cannot_be_below_the_ttl() -> None:
    with pytest.raises(ConfigError, match="max_lifetime_s"):
        AccessTokens(SECRET, ISS, AUD, ttl_s=900, max_lifetime_s=600)
    with pytest.raises(ConfigError, match="TENFOLD_ACCESS_TOKEN_MAX_LIFETIME_S"):
        load_settings(access_ttl_s=900, access_token_max_lifetime_s=600)
