"""Authentication building blocks for the gateway: passwords, access tokens, refresh tokens.

- `PasswordHasher`: argon2id hashing off the event loop, bounded in memory,
  with a password policy (`PasswordPolicyError`).
- `AccessTokens`: short-lived JWTs with one pinned algorithm (HS256, EdDSA or
  ES256) and issuer, audience and expiry checked (`TokenInvalid`, `TokenExpired`).
- `RefreshTokens`: opaque refresh tokens stored hashed on the user's shard,
  rotated on use, revocable by family; a replayed token revokes its family
  (`TokenReused`).

Every refusal is an `AuthError` carrying `http_status`, a client-safe `reason`
and headers (`WWW-Authenticate`), which `tenfold.gateway.problems` answers with.
"""

from __future__ import annotations

from tenfold.errors import (
    AuthError,
    InvalidCredentials,
    PasswordHashInvalid,
    PasswordPolicyError,
    TokenExpired,
    TokenInvalid,
    TokenReused,
)
from tenfold.gateway.auth.passwords import (
    OWASP,
    TESTING,
    PasswordHasher,
    PasswordParams,
    check_password_policy,
)
from tenfold.gateway.auth.refresh import IssuedToken, RefreshTokens, Rotated
from tenfold.gateway.auth.tokens import ALGORITHMS, AccessTokens, Claims, KeyPair

__all__ = [
    "ALGORITHMS",
    "OWASP",
    "TESTING",
    "AccessTokens",
    "AuthError",
    "Claims",
    "InvalidCredentials",
    "IssuedToken",
    "KeyPair",
    "PasswordHashInvalid",
    "PasswordHasher",
    "PasswordParams",
    "PasswordPolicyError",
    "RefreshTokens",
    "Rotated",
    "TokenExpired",
    "TokenInvalid",
    "TokenReused",
    "check_password_policy",
]
