"""Refresh tokens on real shards (SQLite and PostgreSQL): rotation, reuse detection, revocation."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tenfold import ShardedDatabase
from tenfold.data.schema import slot_convention
from tenfold.errors import ConfigError, TokenExpired, TokenInvalid, TokenReused
from tenfold.gateway.auth import RefreshTokens
from tenfold.gateway.auth.refresh import TABLE, parse_token
from tenfold.ids import slot_of_id
from tenfold.keyspace import slot_of

MakeDb = Callable[..., Awaitable[ShardedDatabase]]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def rows_of(db: ShardedDatabase, user: str | int) -> list[Any]:
    async with db.shard_for(user) as conn:
        return await conn.fetch(
            f"SELECT token_id, family_id, secret_hash, used_at, revoked_at, replaced_by, slot "
            f"FROM {TABLE} WHERE user_id = $1 ORDER BY token_id",
            str(user),
        )


async def test_issue_rotate_chain_routes_by_id(make_db: MakeDb) -> None:
    db = await make_db(shards=4)
    refresh = RefreshTokens(db)
    first, expires_at = await refresh.issue("alice")
    assert expires_at == pytest.approx(time.time() + 30 * 86_400, abs=60)
    token_id, _ = parse_token(first)
    assert slot_of_id(token_id) == slot_of("alice")

    chain = [first]
    for _ in range(5):
        user, nxt = await refresh.rotate(chain[-1])
        assert user == "alice"
        assert nxt not in chain
        chain.append(nxt)

    rows = await rows_of(db, "alice")
    assert len(rows) == 6
    assert {r["family_id"] for r in rows} == {token_id}
    assert all(r["slot"] == slot_of("alice") for r in rows)
    assert [r["used_at"] is not None for r in rows] == [True] * 5 + [False]
    assert [r["replaced_by"] for r in rows[:-1]] == [r["token_id"] for r in rows[1:]]
    # The row lives on the shard that owns the user, and nowhere else.
    owner = db.shard_name_for("alice")
    for name in db.shard_names:
        async with db.shard(name) as conn:
            count = await conn.fetchval(f"SELECT COUNT(*) FROM {TABLE}")
        assert count == (6 if name == owner else 0)


async def test_int_user_ids_keep_their_type_and_slot(make_db: MakeDb) -> None:
    db = await make_db(shards=4)
    refresh = RefreshTokens(db)
    token, _ = await refresh.issue(42)
    user, token2 = await refresh.rotate(token)
    assert user == 42 and isinstance(user, int)
    assert slot_of_id(parse_token(token2)[0]) == slot_of(42)
    # "42" is a different user: revoking it leaves user 42's token alone.
    assert await refresh.revoke_all("42") == 0
    assert (await refresh.rotate(token2)).user_id == 42


async def test_reuse_after_rotation_revokes_the_whole_family(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    refresh = RefreshTokens(db)
    t1, _ = await refresh.issue("bob")
    _, t2 = await refresh.rotate(t1)
    _, t3 = await refresh.rotate(t2)
    other_session, _ = await refresh.issue("bob")  # another device: another family

    with pytest.raises(TokenReused) as info:
        await refresh.rotate(t1)  # the thief (or the user) replays an old token
    assert info.value.http_status == 401
    assert t1 not in str(info.value)
    # The newest token of the family is dead too, and stays dead.
    with pytest.raises(TokenReused):
        await refresh.rotate(t3)
    with pytest.raises(TokenReused):
        await refresh.rotate(t2)
    # The other family is untouched.
    user, _ = await refresh.rotate(other_session)
    assert user == "bob"
    family = parse_token(t1)[0]
    rows = [r for r in await rows_of(db, "bob") if r["family_id"] == family]
    assert len(rows) == 3 and all(r["revoked_at"] is not None for r in rows)


async def test_logout_revokes_the_family(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    refresh = RefreshTokens(db)
    t1, _ = await refresh.issue("carol")
    _, t2 = await refresh.rotate(t1)
    assert await refresh.revoke(t2) is True
    with pytest.raises(TokenInvalid):
        await refresh.rotate(t2)
    assert await refresh.revoke(t2) is True  # idempotent
    assert await refresh.revoke("garbage") is False
    # Known id, wrong secret: not recognised, nothing revoked.
    t3, _ = await refresh.issue("carol")
    token_id = t3.split(".")[0]
    assert await refresh.revoke(f"{token_id}.{'A' * 43}") is False
    assert (await refresh.rotate(t3)).user_id == "carol"


async def test_revoke_all_logs_out_everywhere(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    refresh = RefreshTokens(db)
    sessions = [(await refresh.issue("dave")).token for _ in range(3)]
    keep, _ = await refresh.issue("erin")
    assert await refresh.revoke_all("dave") == 3
    for token in sessions:
        with pytest.raises(TokenInvalid):
            await refresh.rotate(token)
    assert (await refresh.rotate(keep)).user_id == "erin"
    assert await refresh.revoke_all("dave") == 0


async def test_expired_token(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    clock = Clock()
    refresh = RefreshTokens(db, ttl_s=60, clock=clock)
    token, expires_at = await refresh.issue("frank")
    assert expires_at == clock.now + 60
    clock.now += 61
    with pytest.raises(TokenExpired) as info:
        await refresh.rotate(token)
    assert isinstance(info.value, TokenInvalid)
    # A rotation restarts the lifetime.
    fresh, _ = await refresh.issue("frank")
    clock.now += 50
    _, nxt = await refresh.rotate(fresh)
    clock.now += 50
    assert (await refresh.rotate(nxt)).user_id == "frank"


async def test_malformed_tokens_are_token_invalid(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    refresh = RefreshTokens(db)
    real, _ = await refresh.issue("gina")
    token_id, secret = real.split(".")
    unknown_id = db.new_id("somebody-else")  # a valid id routing to a shard, never stored
    cases: list[Any] = [
        None,
        "",
        "no-dot-at-all",
        ".",
        f"{token_id}.",
        f".{secret}",
        f"abc.{secret}",
        f"-{token_id}.{secret}",
        f"+{token_id}.{secret}",
        f"0.{secret}",
        f"{2**63}.{secret}",
        f"{'9' * 40}.{secret}",
        f"{token_id}.{secret}.extra",
        f"{token_id}.{secret[:-1]}",
        f"{token_id}.{secret[:-1]}!",
        f"{token_id} .{secret}",
        f"１２３.{secret}",  # fullwidth digits
        f"{unknown_id}.{secret}",
        f"{token_id}.{'A' * 43}",  # right id, wrong secret
        "x" * 10_000,
        12345,
    ]
    for bad in cases:
        with pytest.raises(TokenInvalid) as info:
            await refresh.rotate(bad)
        assert type(info.value) is TokenInvalid, bad
        if isinstance(bad, str) and len(bad) > 2:
            assert bad not in str(info.value)
    # None of it touched the real token.
    assert (await refresh.rotate(real)).user_id == "gina"


async def test_concurrent_double_rotation_exactly_one_wins(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    refresh = RefreshTokens(db)
    for round_ in range(5):
        token, _ = await refresh.issue(f"henry{round_}")
        results = await asyncio.gather(
            refresh.rotate(token), refresh.rotate(token), return_exceptions=True
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1, results
        assert len(lost) == 1 and isinstance(lost[0], TokenReused), results
        # The loser's reuse revoked the family, the winner's new token included.
        with pytest.raises(TokenReused):
            await refresh.rotate(won[0].token)


# PostgreSQL only: SQLite's BEGIN IMMEDIATE never lets the two reads interleave.
@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_interleaved_rotations_are_decided_by_the_conditional_update(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both rotations read the row as unused before either writes: the UPDATE decides."""
    from tenfold.data.postgres import PostgresConnection

    db = await make_db(shards=1)
    refresh = RefreshTokens(db)
    token, _ = await refresh.issue("race")
    both_read = asyncio.Barrier(2)
    original = PostgresConnection.fetchrow

    async def fetchrow(self: PostgresConnection, sql: str, *args: Any, **kw: Any) -> Any:
        row = await original(self, sql, *args, **kw)
        if "FROM tenfold_refresh_tokens WHERE token_id" in sql:
            await asyncio.wait_for(both_read.wait(), 5)
        return row

    monkeypatch.setattr(PostgresConnection, "fetchrow", fetchrow)
    results = await asyncio.gather(
        refresh.rotate(token), refresh.rotate(token), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1, results
    assert any(isinstance(r, TokenReused) for r in results), results
    assert len(await rows_of(db, "race")) == 2


async def test_many_concurrent_rotations_of_one_token(make_db: MakeDb) -> None:
    db = await make_db(shards=1)
    refresh = RefreshTokens(db)
    token, _ = await refresh.issue("ivy")
    results = await asyncio.gather(
        *(refresh.rotate(token) for _ in range(8)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, TokenReused) for r in results if isinstance(r, BaseException))
    rows = await rows_of(db, "ivy")
    assert len(rows) == 2  # the original and the single successor


async def test_stored_value_is_a_digest_not_the_secret(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    refresh = RefreshTokens(db)
    token, _ = await refresh.issue("jack")
    _, secret = token.split(".")
    (row,) = await rows_of(db, "jack")
    assert secret not in str(row["secret_hash"])
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    async with db.shard_for("jack") as conn:
        dump = " ".join(str(v) for r in await conn.fetch(f"SELECT * FROM {TABLE}") for v in r)
    assert secret not in dump


async def test_pepper_changes_the_digest(make_db: MakeDb) -> None:
    db = await make_db(shards=1)
    peppered = RefreshTokens(db, pepper=b"p" * 32)
    token, _ = await peppered.issue("kate")
    _, secret = token.split(".")
    (row,) = await rows_of(db, "kate")
    assert row["secret_hash"] != hashlib.sha256(secret.encode()).hexdigest()
    # Without the pepper the token is not recognised (and nothing is revoked).
    with pytest.raises(TokenInvalid):
        await RefreshTokens(db).rotate(token)
    assert (await peppered.rotate(token)).user_id == "kate"
    with pytest.raises(ConfigError):
        RefreshTokens(db, pepper=b"short")


async def test_issue_into_a_family(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    refresh = RefreshTokens(db)
    token, _ = await refresh.issue("liam")
    family = parse_token(token)[0]
    extra, _ = await refresh.issue("liam", family=family)
    assert {r["family_id"] for r in await rows_of(db, "liam")} == {family}
    with pytest.raises(TokenInvalid):
        await refresh.issue("mona", family=family)  # another user's family
    with pytest.raises(TokenInvalid):
        await refresh.issue("liam", family=db.new_id("liam"))  # no such family
    await refresh.revoke(extra)
    with pytest.raises(TokenInvalid):
        await refresh.issue("liam", family=family)  # revoked family


async def test_purge_expired(make_db: MakeDb) -> None:
    db = await make_db(shards=2)
    clock = Clock()
    refresh = RefreshTokens(db, ttl_s=60, clock=clock)
    for user in ("nina", "omar", "pete"):
        await refresh.issue(user)
    clock.now += 30
    live, _ = await refresh.issue("quin")
    clock.now += 31 + 10
    purged = await refresh.purge_expired(grace_s=5)
    assert sum(purged.values()) == 3 and set(purged) == set(db.shard_names)
    assert (await refresh.rotate(live)).user_id == "quin"


async def test_table_follows_the_slot_convention(make_db: MakeDb) -> None:
    # `slot_convention` skips tenfold_* tables, so check ours directly: an index led by slot.
    db = await make_db(shards=1)
    pool = db.pool("s0")
    async with pool.acquire() as conn:
        if pool.dialect == "sqlite":
            indexes = [r[1] for r in await conn.fetch(f"PRAGMA index_list({TABLE})")]
            firsts = [(await conn.fetchrow(f"PRAGMA index_info({i})"))[2] for i in indexes]
        else:
            firsts = [
                r[0]
                for r in await conn.fetch(
                    "SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                    "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] "
                    "WHERE c.relname = $1",
                    TABLE,
                )
            ]
    assert firsts.count("slot") >= 2  # by user and by family
    assert await slot_convention(pool) == []


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        RefreshTokens(None, ttl_s=0)  # type: ignore[arg-type]
