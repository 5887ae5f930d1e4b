"""Short-lived JWT access tokens: one pinned algorithm, issuer, audience and expiry checked.

Invariants:
- A verifier accepts exactly one algorithm, the one it was built with: a token
  whose header names another (`none`, or HS256 against an EdDSA/ES256
  verifier, the algorithm-confusion attack) is refused before any key is used.
- `exp`, `iat`, `iss`, `aud` and `sub` are required; the issuer and the
  audience must match; `exp`/`nbf`/`iat` are checked with `leeway_s` of clock
  skew. The header must say `typ: at+jwt` (RFC 9068), so another kind of JWT
  signed with the same key is not taken for an access token.
- A token lives at most `max_lifetime_s`: one whose `exp - iat`, or whose
  `exp - now`, is longer is refused. A leaked key or a buggy issuer must not
  mint tokens that outlive every rotation (an `exp` of 2^80 passes PyJWT).
- HS256 secrets have at least 32 bytes; asymmetric keys must be of the
  algorithm's type (Ed25519 for EdDSA, P-256 for ES256), else `ConfigError`.
- Every refusal is a `TokenInvalid` (or `TokenExpired`) whose `reason` is safe
  to show the client; the token itself is never part of an error.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tenfold.errors import ConfigError, TokenExpired, TokenInvalid

__all__ = ["ALGORITHMS", "AccessTokens", "Claims", "KeyPair"]

ALGORITHMS: Final = ("HS256", "EdDSA", "ES256")
TOKEN_TYPE: Final = "at+jwt"
MIN_SECRET_BYTES: Final = 32
# Far above any token we issue; a bigger "token" is refused without parsing.
_MAX_TOKEN_CHARS: Final = 8192
_REGISTERED: Final = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})
_REQUIRED: Final = ["exp", "iat", "iss", "aud", "sub"]


@dataclass(frozen=True, slots=True)
class KeyPair:
    """PEM keys for EdDSA (Ed25519) or ES256 (P-256).

    `public_key` may be left out when `private_key` is given (it is derived);
    `private_key` may be left out for a verify-only `AccessTokens`.
    """

    private_key: str | bytes | None = None
    public_key: str | bytes | None = None

    @classmethod
    def generate(cls, algorithm: str = "EdDSA") -> KeyPair:
        """A fresh key pair (for tests and development; load real keys from a secret store)."""
        private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
        if algorithm == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        elif algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ConfigError("KeyPair.generate", f"no key pairs for algorithm {algorithm!r}")
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(pem, public)


@dataclass(frozen=True, slots=True)
class Claims:
    """The checked claims of an access token."""

    subject: str
    issuer: str
    audience: str | list[str]
    issued_at: int
    expires_at: int
    not_before: int | None = None
    token_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        """An extra (non-registered) claim by name."""
        return self.extra[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


class AccessTokens:
    """Issue and verify access tokens.

    Args:
        secret_or_keys: the HS256 secret (str or bytes, at least 32 bytes), or a
            `KeyPair` for EdDSA / ES256.
        issuer: the `iss` written and required.
        audience: the `aud` written and required.
        ttl_s: lifetime of an issued token (default 15 minutes).
        algorithm: "HS256", "EdDSA" or "ES256"; the only one `verify` accepts.
        leeway_s: clock skew tolerated on `exp`, `nbf` and `iat`.
        key_id: written as the header's `kid` (to pick a key when rotating keys).
        clock: Unix seconds, used for `iat`/`nbf`/`exp` of issued tokens (tests).
        cache_size: verified tokens remembered (0 turns the cache off). A
            client sends the same token on every request until it expires, and
            a full check (two base64 passes, JSON, HMAC or signature, claims)
            costs more than the rest of a small request; Envoy's jwt_authn
            keeps such a cache too. A hit is the exact same token string, and
            its expiry is still checked on every use.
        max_lifetime_s: the longest lifetime a verified token may claim
            (`exp - iat`, and `exp` counted from now); at least `ttl_s`.
    """

    def __init__(
        self,
        secret_or_keys: str | bytes | KeyPair,
        issuer: str,
        audience: str,
        ttl_s: float = 900,
        algorithm: str = "HS256",
        leeway_s: float = 30.0,
        *,
        key_id: str | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
        max_lifetime_s: float = 3600.0,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError(
                "AccessTokens.algorithm",
                f"{algorithm!r} is not supported; use one of {', '.join(ALGORITHMS)}",
            )
        if not isinstance(issuer, str) or not issuer:
            raise ConfigError("AccessTokens.issuer", "must be a non-empty string")
        if not isinstance(audience, str) or not audience:
            raise ConfigError("AccessTokens.audience", "must be a non-empty string")
        if not 0 < ttl_s <= 86_400:
            raise ConfigError(
                "AccessTokens.ttl_s",
                f"must be in (0, 86400] s, got {ttl_s}: access tokens are short-lived; "
                "use refresh tokens for long sessions",
            )
        if not 0 <= leeway_s <= 300:
            raise ConfigError("AccessTokens.leeway_s", f"must be in [0, 300] s, got {leeway_s}")
        if not ttl_s <= max_lifetime_s <= 7 * 86_400:
            raise ConfigError(
                "AccessTokens.max_lifetime_s",
                f"must be in [ttl_s ({ttl_s}), 604800] s, got {max_lifetime_s}: tokens this "
                "process issues must pass its own check",
            )
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        self.leeway_s = leeway_s
        self.max_lifetime_s = max_lifetime_s
        self.key_id = key_id
        self._clock = clock
        self._cache_size = max(0, cache_size)
        # OrderedDict: evicting from the front of a plain dict skips its deleted slots
        self._verified: OrderedDict[str, Claims] = OrderedDict()
        self._signing: Any
        self._verifying: Any
        if algorithm == "HS256":
            self._signing = self._verifying = self._hmac_secret(secret_or_keys)
        else:
            self._signing, self._verifying = self._key_pair(secret_or_keys, algorithm)
        self._jwt = jwt.PyJWT(
            {
                "verify_signature": True,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iat": True,
                "verify_aud": True,
                "verify_iss": True,
                "verify_sub": True,
                "verify_jti": True,
                "require": list(_REQUIRED),
            }
        )

    @staticmethod
    def _hmac_secret(secret: str | bytes | KeyPair) -> bytes:
        if not isinstance(secret, str | bytes):
            raise ConfigError(
                "AccessTokens.secret_or_keys", "HS256 needs a secret (str or bytes), not a KeyPair"
            )
        raw = _as_bytes(secret)
        if len(raw) < MIN_SECRET_BYTES:
            raise ConfigError(
                "AccessTokens.secret_or_keys",
                f"an HS256 secret needs at least {MIN_SECRET_BYTES} bytes, got {len(raw)}; "
                'generate one with `python -c "import secrets; print(secrets.token_urlsafe(48))"`',
            )
        if raw.lstrip().startswith(b"-----BEGIN") or raw.startswith(b"ssh-"):
            raise ConfigError(
                "AccessTokens.secret_or_keys",
                "the HS256 secret looks like a PEM or SSH key; asymmetric keys go in a KeyPair "
                "with algorithm EdDSA or ES256",
            )
        return raw

    @staticmethod
    def _key_pair(keys: str | bytes | KeyPair, algorithm: str) -> tuple[Any, Any]:
        setting = "AccessTokens.secret_or_keys"
        if not isinstance(keys, KeyPair):
            raise ConfigError(setting, f"{algorithm} needs a KeyPair of PEM keys, not a secret")
        if keys.private_key is None and keys.public_key is None:
            raise ConfigError(setting, "the KeyPair has neither a private nor a public key")
        want: tuple[type, type]
        if algorithm == "EdDSA":
            want = (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)
        else:
            want = (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)
        private: Any = None
        public: Any = None
        try:
            if keys.private_key is not None:
                private = serialization.load_pem_private_key(
                    _as_bytes(keys.private_key), password=None
                )
            if keys.public_key is not None:
                public = serialization.load_pem_public_key(_as_bytes(keys.public_key))
        except (ValueError, TypeError) as exc:
            raise ConfigError(setting, f"cannot load the PEM key: {exc}") from None
        if private is not None and not isinstance(private, want[0]):
            raise ConfigError(
                setting, f"the private key is a {type(private).__name__}, not a {algorithm} key"
            )
        if public is not None and not isinstance(public, want[1]):
            raise ConfigError(
                setting, f"the public key is a {type(public).__name__}, not a {algorithm} key"
            )
        if algorithm == "ES256":
            for key in (private, public):
                curve = getattr(key, "curve", None)
                if key is not None and not isinstance(curve, ec.SECP256R1):
                    name = getattr(curve, "name", "?")
                    raise ConfigError(setting, f"ES256 needs a P-256 key, got curve {name}")
        if private is not None:
            derived = private.public_key()
            if public is not None and _spki(derived) != _spki(public):
                raise ConfigError(setting, "the public key does not belong to the private key")
            public = derived
        return private, public

    # -- issue ------------------------------------------------------------

    def issue(self, subject: str, **claims: Any) -> str:
        """A signed token for `subject` with `claims` added (registered claims are set here)."""
        if self._signing is None:
            raise ConfigError(
                "AccessTokens.secret_or_keys",
                "this instance has only a public key: it can verify tokens but not issue them",
            )
        if not isinstance(subject, str) or not subject:
            raise TypeError("AccessTokens.issue: subject must be a non-empty str")
        clash = _REGISTERED.intersection(claims)
        if clash:
            raise TypeError(
                f"AccessTokens.issue: claim(s) {', '.join(sorted(clash))} are set by "
                "AccessTokens itself and cannot be passed"
            )
        now = int(self._clock())
        payload: dict[str, Any] = {
            **claims,
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + int(self.ttl_s),
            "jti": secrets.token_urlsafe(16),
        }
        headers: dict[str, Any] = {"typ": TOKEN_TYPE}
        if self.key_id is not None:
            headers["kid"] = self.key_id
        return jwt.encode(payload, self._signing, algorithm=self.algorithm, headers=headers)

    # -- verify -----------------------------------------------------------

    def verify(self, token: str) -> Claims:
        """The claims of a valid token.

        Raises:
            TokenExpired: the token is past its `exp` (plus leeway).
            TokenInvalid: anything else wrong: malformed, wrong algorithm,
                bad signature, wrong issuer or audience, missing claims, not
                yet valid.
        """
        cached = self._verified.get(token) if isinstance(token, str) else None
        if cached is not None:
            if time.time() > cached.expires_at + self.leeway_s:  # PyJWT's clock
                del self._verified[token]
                raise TokenExpired("access token expired")
            return cached
        claims = self._verify(token)
        if self._cache_size:
            if len(self._verified) >= self._cache_size:
                # Oldest first: dicts keep insertion order, and old tokens expire first.
                self._verified.popitem(last=False)
            self._verified[token] = claims
        return claims

    def _verify(self, token: str) -> Claims:
        if not isinstance(token, str) or not token:
            raise TokenInvalid("missing access token")
        if len(token) > _MAX_TOKEN_CHARS or token.count(".") != 2:
            raise TokenInvalid("malformed access token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenInvalid("malformed access token") from None
        if header.get("alg") != self.algorithm:
            raise TokenInvalid("access token algorithm not accepted")
        if header.get("typ") != TOKEN_TYPE:
            raise TokenInvalid("not an access token")
        try:
            payload = self._jwt.decode(
                token,
                self._verifying,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("access token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenInvalid("access token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise TokenInvalid("access token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise TokenInvalid("access token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenInvalid(f"access token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise TokenInvalid("access token algorithm not accepted") from None
        except jwt.InvalidSignatureError:
            raise TokenInvalid("access token signature invalid") from None
        except jwt.PyJWTError:
            raise TokenInvalid("malformed access token") from None
        except (ValueError, TypeError):  # a hostile payload PyJWT did not anticipate
            raise TokenInvalid("malformed access token") from None
        claims = _claims(payload)
        self._check_lifetime(claims)
        return claims

    def _check_lifetime(self, claims: Claims) -> None:
        # PyJWT checks that exp is in the future and iat not, never how far apart
        # they are; the leeway covers the skew between the issuer's clock and ours.
        bound = self.max_lifetime_s + self.leeway_s
        if claims.expires_at - claims.issued_at > bound or claims.expires_at - time.time() > bound:
            raise TokenInvalid(
                f"access token lifetime exceeds the {self.max_lifetime_s:g} s allowed; "
                "log in again for a new token"
            )


def _claims(payload: dict[str, Any]) -> Claims:
    def integer(name: str) -> int:
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TokenInvalid(f"access token claim {name!r} is not a number")
        return int(value)

    subject = payload["sub"]
    if not isinstance(subject, str) or not subject:
        raise TokenInvalid("access token claim 'sub' is not a non-empty string")
    audience = payload["aud"]
    jti = payload.get("jti")
    return Claims(
        subject=subject,
        issuer=str(payload["iss"]),
        audience=audience if isinstance(audience, str) else [str(a) for a in audience],
        issued_at=integer("iat"),
        expires_at=integer("exp"),
        not_before=integer("nbf") if "nbf" in payload else None,
        token_id=jti if isinstance(jti, str) else None,
        extra=MappingProxyType({k: v for k, v in payload.items() if k not in _REGISTERED}),
    )


def _spki(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data
