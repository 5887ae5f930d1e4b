"""Refresh tokens: stored hashed on the user's shard, rotated on use, revocable by family.

A token is ``<token_id>.<secret>``: `token_id` is a tenfold id made in the
user's slot (so `rotate` routes by the id alone, see `tenfold.ids`), `secret`
is 32 random bytes (base64url). The shard stores only SHA-256 of the secret
(HMAC-SHA-256 with `pepper` when one is set): the secret is high-entropy, so
a slow KDF adds nothing, and a stolen table holds nothing usable.

A **family** is every token descended from one sign-in. Rotation marks the
presented token used and issues the next one of its family, in one
transaction on the user's shard.

Invariants:
- A token rotates at most once: the rotation is a conditional
  ``UPDATE ... WHERE used_at IS NULL AND revoked_at IS NULL`` whose row count
  decides; of two concurrent rotations exactly one succeeds.
- Presenting a used or revoked token (with its right secret) revokes its whole
  family, newest token included, and raises `TokenReused`: a replayed token
  means it was stolen, and the thief and the user cannot be told apart.
- A token whose id is unknown, or whose secret does not match, raises
  `TokenInvalid` and changes nothing: knowing a token id is not enough to
  revoke anyone's session.
- Malformed input never reaches the database and never raises anything but
  `TokenInvalid`; no error or log line contains a token or a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import Final, NamedTuple

from tenfold.data.base import Connection, Record
from tenfold.data.router import ShardedDatabase
from tenfold.errors import ConfigError, KeyspaceError, TokenExpired, TokenInvalid, TokenReused
from tenfold.ids import slot_of_id
from tenfold.keyspace import slot_of

__all__ = ["TABLE", "IssuedToken", "RefreshTokens", "Rotated", "parse_token", "stored_digest"]

log = logging.getLogger("tenfold.auth")

TABLE: Final = "tenfold_refresh_tokens"
_SECRET_BYTES: Final = 32
_SECRET_CHARS: Final = 43  # base64url of 32 bytes, unpadded
_B64URL: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_MAX_ID_DIGITS: Final = 19  # 2**63 - 1 has 19 digits

UserId = str | int

_SELECT: Final = (
    f"SELECT slot, user_id, user_kind, family_id, secret_hash, expires_at, used_at, revoked_at "
    f"FROM {TABLE} WHERE token_id = $1"
)
_MARK_USED: Final = (
    f"UPDATE {TABLE} SET used_at = $1, replaced_by = $2 "
    f"WHERE token_id = $3 AND used_at IS NULL AND revoked_at IS NULL"
)
_REVOKE_FAMILY: Final = (
    f"UPDATE {TABLE} SET revoked_at = $1 WHERE slot = $2 AND family_id = $3 AND revoked_at IS NULL"
)
_REVOKE_USER: Final = (
    f"UPDATE {TABLE} SET revoked_at = $1 "
    f"WHERE slot = $2 AND user_id = $3 AND user_kind = $4 AND revoked_at IS NULL"
)
_FAMILY_STATE: Final = (
    f"SELECT COUNT(*), COUNT(revoked_at) FROM {TABLE} "
    f"WHERE slot = $1 AND family_id = $2 AND user_id = $3 AND user_kind = $4"
)
_PURGE: Final = f"DELETE FROM {TABLE} WHERE expires_at < $1"


class IssuedToken(NamedTuple):
    """A new refresh token and when it expires (Unix seconds)."""

    token: str
    expires_at: float


class Rotated(NamedTuple):
    """The owner of a rotated token and the token that replaces it."""

    user_id: UserId
    token: str


def _user_kind(user_id: object) -> str:
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        raise TypeError(f"user_id must be a str or an int, got {type(user_id).__name__}")
    if isinstance(user_id, str) and not user_id:
        raise TypeError("user_id must not be empty")
    return "i" if isinstance(user_id, int) else "s"


def _user_of(row: Record) -> UserId:
    value = str(row["user_id"])
    return int(value) if row["user_kind"] == "i" else value


def stored_digest(secret: str, pepper: bytes | None = None) -> str:
    """The digest stored for a token's `secret`: SHA-256, or HMAC-SHA-256 with a pepper."""
    raw = secret.encode("ascii")
    if pepper is not None:
        return hmac.new(pepper, raw, hashlib.sha256).hexdigest()
    return hashlib.sha256(raw).hexdigest()


def parse_token(token: object) -> tuple[int, str]:
    """`(token_id, secret)` of a well-formed token string, else `TokenInvalid`."""
    if not isinstance(token, str) or not token:
        raise TokenInvalid("missing refresh token")
    id_part, dot, secret = token.partition(".")
    if (
        not dot
        or not 0 < len(id_part) <= _MAX_ID_DIGITS
        or not (id_part.isascii() and id_part.isdigit())
        or len(secret) != _SECRET_CHARS
        or not _B64URL.issuperset(secret)
    ):
        raise TokenInvalid("malformed refresh token")
    token_id = int(id_part)
    try:
        slot_of_id(token_id)
    except KeyspaceError:
        raise TokenInvalid("malformed refresh token") from None
    return token_id, secret


class RefreshTokens:
    """Issue, rotate and revoke refresh tokens on a `ShardedDatabase`.

    The table comes with tenfold's built-in shard migrations
    (`await db.migrate()`); the database must be open with ids (the default).

    Args:
        db: the open sharded database.
        ttl_s: lifetime of each token (default 30 days); a rotation starts a
            new lifetime, so an active session stays signed in.
        pepper: optional server-side key (>= 32 bytes) mixed into the stored
            digest, so a leaked table cannot even be checked against a token.
        clock: Unix seconds (injected by tests).
    """

    def __init__(
        self,
        db: ShardedDatabase,
        ttl_s: float = 30 * 86_400,
        *,
        pepper: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ConfigError("RefreshTokens.ttl_s", f"must be > 0, got {ttl_s}")
        if pepper is not None and len(pepper) < 32:
            raise ConfigError("RefreshTokens.pepper", f"needs at least 32 bytes, got {len(pepper)}")
        self.db = db
        self.ttl_s = ttl_s
        self._pepper = pepper
        self._clock = clock

    def _digest(self, secret: str) -> str:
        return stored_digest(secret, self._pepper)

    async def _insert(
        self, conn: Connection, user_id: UserId, token_id: int, family: int, now: float
    ) -> IssuedToken:
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        expires_at = now + self.ttl_s
        await conn.insert(
            TABLE,
            {
                "token_id": token_id,
                "user_id": str(user_id),
                "user_kind": _user_kind(user_id),
                "family_id": family,
                "secret_hash": self._digest(secret),
                "created_at": now,
                "expires_at": expires_at,
            },
        )
        return IssuedToken(f"{token_id}.{secret}", expires_at)

    async def issue(self, user_id: UserId, family: int | None = None) -> IssuedToken:
        """A new token for `user_id`: a new family (a sign-in), or the next of `family`.

        Raises:
            TokenInvalid: `family` is not a live family of this user.
        """
        kind = _user_kind(user_id)
        now = self._clock()
        token_id = self.db.new_id(user_id)

        async def write(conn: Connection) -> IssuedToken:
            if family is not None:
                row = await conn.fetchrow(
                    _FAMILY_STATE, slot_of(user_id), family, str(user_id), kind
                )
                if row is None or row[0] == 0 or row[1] != 0:
                    raise TokenInvalid("refresh token family unknown or revoked")
            return await self._insert(
                conn, user_id, token_id, token_id if family is None else family, now
            )

        # Refused mid-reshard (SlotMoved): runs again on the user's new shard.
        return await self.db.transaction_for(user_id, write)

    async def rotate(self, token: str) -> Rotated:
        """Use `token` once: mark it used and return its user and the next token.

        Raises:
            TokenInvalid: malformed, unknown, or a wrong secret (nothing changes).
            TokenExpired: past its expiry (a subclass of `TokenInvalid`).
            TokenReused: already used or revoked; its whole family is now revoked.
        """
        token_id, secret = parse_token(token)
        digest = self._digest(secret)
        now = self._clock()

        async def use(conn: Connection) -> tuple[Record | None, Rotated | None]:
            row = await conn.fetchrow(_SELECT, token_id)
            if row is None or not hmac.compare_digest(str(row["secret_hash"]), digest):
                raise TokenInvalid("refresh token not recognised; sign in again")
            if row["used_at"] is not None or row["revoked_at"] is not None:
                await conn.execute(_REVOKE_FAMILY, now, row["slot"], row["family_id"])
                return row, None
            if row["expires_at"] <= now:
                raise TokenExpired("refresh token expired; sign in again")
            user_id = _user_of(row)
            next_id = self.db.new_id(user_id)
            if await conn.execute(_MARK_USED, now, next_id, token_id) != 1:
                # A concurrent rotation of the same token won the row: this
                # is a second use, handled like any other reuse.
                await conn.execute(_REVOKE_FAMILY, now, row["slot"], row["family_id"])
                return row, None
            issued = await self._insert(conn, user_id, next_id, row["family_id"], now)
            return None, Rotated(user_id, issued.token)

        # Refused mid-reshard (SlotMoved): runs again on the token's new shard.
        reused, result = await self.db.transaction_for_id(token_id, use)
        # Raised after the commit: the family's revocation must stick.
        if reused is not None:
            log.warning(
                "refresh token %s of user %s presented again after %s: family %s revoked",
                token_id,
                reused["user_id"],
                "revocation" if reused["revoked_at"] is not None else "rotation",
                reused["family_id"],
            )
            raise TokenReused("refresh token already used; the session was ended, sign in again")
        assert result is not None
        return result

    async def revoke(self, token: str) -> bool:
        """Log out: revoke `token`'s whole family. False if the token is not recognised.

        Idempotent: revoking an already revoked family answers True and changes nothing.
        """
        try:
            token_id, secret = parse_token(token)
        except TokenInvalid:
            return False
        digest = self._digest(secret)
        async with self.db.shard_for_id(token_id) as conn, conn.transaction():
            row = await conn.fetchrow(_SELECT, token_id)
            if row is None or not hmac.compare_digest(str(row["secret_hash"]), digest):
                return False
            await conn.execute(_REVOKE_FAMILY, self._clock(), row["slot"], row["family_id"])
        return True

    async def revoke_all(self, user_id: UserId) -> int:
        """Revoke every live refresh token of `user_id` (log out everywhere); how many."""
        kind = _user_kind(user_id)
        async with self.db.shard_for(user_id) as conn:
            count: int = await conn.execute(
                _REVOKE_USER, self._clock(), slot_of(user_id), str(user_id), kind
            )
        return count

    async def purge_expired(self, grace_s: float = 86_400) -> dict[str, int]:
        """Delete tokens that expired more than `grace_s` ago, on every shard; rows per shard.

        Shards that fail are logged and skipped (the next purge retries them).
        """
        cutoff = self._clock() - grace_s
        out: dict[str, int] = {}
        for name in self.db.shard_names:
            try:
                async with self.db.shard(name) as conn:
                    out[name] = await conn.execute(_PURGE, cutoff)
            except Exception as exc:  # one dead shard must not stop the others
                log.warning("refresh token purge failed on shard %s: %s", name, exc)
        return out
