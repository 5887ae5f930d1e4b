"""Access tokens: round trips, and every classic JWT attack refused with a typed, safe error."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from tenfold.errors import ConfigError, TokenExpired, TokenInvalid
from tenfold.gateway.auth import AccessTokens, KeyPair

SECRET = "s" * 16 + "-a-32-byte-plus-test-secret-" + "x" * 8
ISS, AUD = "https://auth.tenfold.test", "tenfold-api"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def hs256(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    signing_input = f"{segment(header)}.{segment(payload)}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "j1",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def tokens() -> AccessTokens:
    return AccessTokens(SECRET, ISS, AUD)


def refused(verifier: AccessTokens, token: Any, fragment: str = "") -> TokenInvalid:
    with pytest.raises(TokenInvalid) as info:
        verifier.verify(token)
    exc = info.value
    assert exc.http_status == 401
    assert fragment in exc.reason, exc.reason
    if isinstance(token, str) and len(token) > 3:
        assert token not in str(exc) and token not in exc.reason
        assert token not in exc.headers.get("WWW-Authenticate", "")
    assert exc.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    return exc


# -- round trips -------------------------------------------------------------


def test_hs256_round_trip(tokens: AccessTokens) -> None:
    token = tokens.issue("user-1", role="admin", rooms=[1, 2])
    got = tokens.verify(token)
    assert got.subject == "user-1"
    assert got.issuer == ISS and got.audience == AUD
    assert got.expires_at - got.issued_at == 900
    assert got.not_before == got.issued_at
    assert got.token_id and got["role"] == "admin" and got.get("rooms") == [1, 2]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_asymmetric_round_trip_and_verify_only(algorithm: str) -> None:
    keys = KeyPair.generate(algorithm)
    issuer = AccessTokens(keys, ISS, AUD, algorithm=algorithm, key_id="k1")
    token = issuer.issue("user-2")
    assert jwt.get_unverified_header(token) == {"alg": algorithm, "typ": "at+jwt", "kid": "k1"}
    verifier = AccessTokens(KeyPair(public_key=keys.public_key), ISS, AUD, algorithm=algorithm)
    assert verifier.verify(token).subject == "user-2"
    with pytest.raises(ConfigError, match="only a public key"):
        verifier.issue("user-2")


def test_each_token_has_its_own_id(tokens: AccessTokens) -> None:
    ids = {tokens.verify(tokens.issue("u")).token_id for _ in range(20)}
    assert len(ids) == 20


def test_registered_claims_cannot_be_overridden(tokens: AccessTokens) -> None:
    with pytest.raises(TypeError, match="exp"):
        tokens.issue("user-1", exp=2**40)
    with pytest.raises(TypeError, match="aud, iss"):
        tokens.issue("user-1", iss="evil", aud="evil")
    with pytest.raises(TypeError):
        tokens.issue("")


# -- attacks -----------------------------------------------------------------


def test_alg_none_is_refused(tokens: AccessTokens) -> None:
    for alg in ("none", "None", "NONE"):
        header = segment({"alg": alg, "typ": "at+jwt"})
        refused(tokens, f"{header}.{segment(claims())}.", "algorithm")
    # PyJWT's own "none" encoding, too.
    unsigned = jwt.encode(claims(), None, algorithm="none", headers={"typ": "at+jwt"})
    refused(tokens, unsigned, "algorithm")


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_algorithm_confusion_is_refused(algorithm: str) -> None:
    keys = KeyPair.generate(algorithm)
    verifier = AccessTokens(keys, ISS, AUD, algorithm=algorithm)
    assert isinstance(keys.public_key, bytes)
    # The attacker knows the public key and signs HS256 with it as the secret.
    for key in (keys.public_key, keys.public_key.strip()):
        forged = hs256({"alg": "HS256", "typ": "at+jwt"}, claims(sub="admin"), key)
        refused(verifier, forged, "algorithm")
    # And the other asymmetric algorithm is not accepted either.
    other = "ES256" if algorithm == "EdDSA" else "EdDSA"
    foreign = AccessTokens(KeyPair.generate(other), ISS, AUD, algorithm=other).issue("u")
    refused(verifier, foreign, "algorithm")


def test_hs256_verifier_refuses_asymmetric_tokens(tokens: AccessTokens) -> None:
    other = AccessTokens(KeyPair.generate("EdDSA"), ISS, AUD, algorithm="EdDSA")
    refused(tokens, other.issue("u"), "algorithm")


def test_expired_is_its_own_error() -> None:
    past = AccessTokens(SECRET, ISS, AUD, leeway_s=5, clock=lambda: time.time() - 3600)
    token = past.issue("user-1")
    with pytest.raises(TokenExpired) as info:
        AccessTokens(SECRET, ISS, AUD).verify(token)
    assert info.value.reason == "access token expired"
    assert isinstance(info.value, TokenInvalid)


def test_leeway_tolerates_small_skew() -> None:
    # Expired 10 s ago, with 30 s of leeway: still accepted.
    skewed = AccessTokens(SECRET, ISS, AUD, ttl_s=60, clock=lambda: time.time() - 70)
    assert AccessTokens(SECRET, ISS, AUD, leeway_s=30).verify(skewed.issue("u")).subject == "u"
    with pytest.raises(TokenExpired):
        AccessTokens(SECRET, ISS, AUD, leeway_s=0).verify(skewed.issue("u"))


def test_not_yet_valid(tokens: AccessTokens) -> None:
    future = AccessTokens(SECRET, ISS, AUD, clock=lambda: time.time() + 3600)
    refused(tokens, future.issue("user-1"), "not yet valid")
    # nbf alone in the future (iat now).
    later = claims(nbf=int(time.time()) + 3600)
    refused(tokens, jwt.encode(later, SECRET, headers={"typ": "at+jwt"}), "not yet valid")


def test_wrong_audience_and_issuer(tokens: AccessTokens) -> None:
    refused(tokens, AccessTokens(SECRET, ISS, "other-api").issue("u"), "audience")
    refused(tokens, AccessTokens(SECRET, "https://evil.test", AUD).issue("u"), "issuer")
    multi = jwt.encode(claims(aud=["x", "y"]), SECRET, headers={"typ": "at+jwt"})
    refused(tokens, multi, "audience")


def test_tampered_payload_and_signature(tokens: AccessTokens) -> None:
    token = tokens.issue("user-1")
    header, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["sub"] = "admin"
    refused(tokens, f"{header}.{segment(body)}.{sig}", "signature")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    refused(tokens, f"{header}.{payload}.{flipped}", "signature")
    refused(tokens, f"{header}.{payload}.", "")
    refused(tokens, f"{header}.{payload}.{sig}{sig}", "")


def test_token_from_another_secret(tokens: AccessTokens) -> None:
    other = AccessTokens("o" * 40, ISS, AUD)
    refused(tokens, other.issue("user-1"), "signature")


@pytest.mark.parametrize("missing", ["exp", "iat", "iss", "aud", "sub"])
def test_missing_required_claims(tokens: AccessTokens, missing: str) -> None:
    token = jwt.encode(claims(**{missing: None}), SECRET, headers={"typ": "at+jwt"})
    refused(tokens, token, "")


def test_wrong_claim_types(tokens: AccessTokens) -> None:
    for bad in (
        claims(sub=42),
        claims(sub=""),
        claims(exp="tomorrow"),
        claims(iat="now"),
        claims(iss=["a"]),
        claims(jti=5),
    ):
        refused(tokens, hs256({"alg": "HS256", "typ": "at+jwt"}, bad, SECRET.encode()))


def test_other_token_types_are_not_access_tokens(tokens: AccessTokens) -> None:
    # Same key, same claims, but an ID token or an untyped JWT.
    refused(tokens, jwt.encode(claims(), SECRET), "not an access token")
    refused(tokens, jwt.encode(claims(), SECRET, headers={"typ": "JWT"}), "not an access token")


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "",
        "abc",
        "a.b",
        "a.b.c",
        "...",
        "é.é.é",
        "Bearer abc.def.ghi",
        "eyJhbGciOiJIUzI1NiJ9.eyJ9.sig",
        "x" * 20_000,
        "a.b.c.d.e",
        b64(b"[1,2]") + "." + b64(b"{}") + ".sig",
        segment({"alg": "HS256", "typ": "at+jwt"}) + "." + b64(b"[1]") + ".sig",
        segment({"alg": "HS256", "typ": "at+jwt"}) + "." + b64(b"\xff\xfe") + ".sig",
        12345,
        b"bytes.are.not",
    ],
)
def test_garbage_is_token_invalid_never_a_crash(tokens: AccessTokens, garbage: Any) -> None:
    refused(tokens, garbage)


# -- configuration -------------------------------------------------------------


def test_short_hs256_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        AccessTokens("short", ISS, AUD)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        AccessTokens(b"x" * 31, ISS, AUD)
    AccessTokens(b"x" * 32, ISS, AUD)


def test_key_kinds_must_match_the_algorithm() -> None:
    ed, es = KeyPair.generate("EdDSA"), KeyPair.generate("ES256")
    assert isinstance(ed.public_key, bytes)
    with pytest.raises(ConfigError, match="PEM"):
        AccessTokens(ed.public_key, ISS, AUD)  # a public key is not an HMAC secret
    with pytest.raises(ConfigError, match="KeyPair"):
        AccessTokens(ed, ISS, AUD, algorithm="HS256")
    with pytest.raises(ConfigError, match="KeyPair"):
        AccessTokens(SECRET, ISS, AUD, algorithm="EdDSA")
    with pytest.raises(ConfigError, match="not a EdDSA key"):
        AccessTokens(es, ISS, AUD, algorithm="EdDSA")
    with pytest.raises(ConfigError, match="not a ES256 key"):
        AccessTokens(ed, ISS, AUD, algorithm="ES256")
    with pytest.raises(ConfigError, match="does not belong"):
        AccessTokens(
            KeyPair(ed.private_key, KeyPair.generate("EdDSA").public_key),
            ISS,
            AUD,
            algorithm="EdDSA",
        )
    with pytest.raises(ConfigError, match="cannot load"):
        AccessTokens(KeyPair(public_key="not pem"), ISS, AUD, algorithm="EdDSA")
    with pytest.raises(ConfigError, match="not supported"):
        AccessTokens(SECRET, ISS, AUD, algorithm="none")
    with pytest.raises(ConfigError, match="not supported"):
        AccessTokens(SECRET, ISS, AUD, algorithm="RS256")
    with pytest.raises(ConfigError):
        AccessTokens(SECRET, "", AUD)
    with pytest.raises(ConfigError):
        AccessTokens(SECRET, ISS, AUD, ttl_s=0)


def test_es256_needs_p256() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError, match="P-256"):
        AccessTokens(KeyPair(pem), ISS, AUD, algorithm="ES256")


def test_verified_tokens_are_cached_but_expiry_still_holds(
    tokens: AccessTokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tokens.issue("user-1", name="ada")
    first = tokens.verify(token)
    calls = 0
    decode = tokens._jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(tokens._jwt, "decode", counting)
    assert tokens.verify(token) is first  # the cache: no second signature check
    assert calls == 0
    assert first.extra["name"] == "ada"
    with pytest.raises(TypeError):
        first.extra["name"] = "eve"  # type: ignore[index]  # shared claims are read-only
    # A changed token string is a miss and gets the full check.
    refused(tokens, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    assert calls == 1
    # A cached token past exp + leeway is refused as expired, and forgotten.
    later = time.time() + 900 + tokens.leeway_s + 1
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(TokenExpired):
        tokens.verify(token)
    assert token not in tokens._verified


def test_token_cache_is_bounded() -> None:
    small = AccessTokens(SECRET, ISS, AUD, cache_size=3)
    issued = [small.issue(f"user-{i}") for i in range(5)]
    for token in issued:
        small.verify(token)
    assert list(small._verified) == issued[2:]  # the oldest went first
    off = AccessTokens(SECRET, ISS, AUD, cache_size=0)
    off.verify(off.issue("user-1"))
    assert off._verified == {}
