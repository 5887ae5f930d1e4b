"""Register, log in, refresh, log out.

A user lives on the shard of their (lower-case) name: the id is made in that
slot, so `shard_for(username)` and `shard_for_id(user_id)` agree. Refresh
tokens are keyed by the name too, so they sit on the same shard.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from starlette.requests import Request

from apps.arena import topics
from apps.arena.schemas import Credentials, RefreshIn, TokensOut, UserOut
from tenfold.data.base import Connection
from tenfold.errors import ConstraintViolation
from tenfold.gateway import Problem, RuntimeDep
from tenfold.gateway.runtime import Runtime
from tenfold.limits import headers as rate_limit_headers

router = APIRouter(prefix="/auth", tags=["auth"])

STARTING_POINTS = 1000
_BAD_LOGIN = "unknown user name or wrong password"
# failed-login rules (app.RATE_LIMITS); "register" is applied by the gateway on its route
FAILED_PER_ACCOUNT = "login_account"
FAILED_PER_IP = "login_ip"


@router.post("/register", status_code=201, response_model=UserOut)
async def register(body: Credentials, rt: RuntimeDep) -> UserOut:
    password_hash = await rt.passwords.hash(body.password)
    user_id = rt.db.new_id(body.username)
    now = time.time()
    try:

        async def create(conn: Connection) -> None:
            await conn.insert(
                "arena_users",
                {
                    "id": user_id,
                    "username": body.username,
                    "password_hash": password_hash,
                    "created_at": now,
                },
            )
            await conn.insert("arena_wallets", {"user_id": user_id, "balance": STARTING_POINTS})
            await rt.bus.emit(
                conn,
                topics.POINTS,
                topics.LEADERBOARD_KEY,
                {"user_id": user_id, "username": body.username, "delta": STARTING_POINTS},
            )

        # Refused mid-reshard (SlotMoved): runs again on the name's new shard.
        await rt.db.transaction_for(body.username, create)
    except ConstraintViolation:
        raise Problem(
            409, f"the user name {body.username!r} is taken", slug="username-taken"
        ) from None
    return UserOut(id=str(user_id), username=body.username)


@router.post("/login", response_model=TokensOut)
async def login(body: Credentials, rt: RuntimeDep, request: Request) -> TokensOut:
    ip = _client_ip(request)
    # Only failures count, so an owner's own logins never do; once an account's
    # (or an IP's) run out, every attempt is refused before hashing, a correct
    # password too, else a guesser would learn which guess was right.
    for rule, subject, whose in (
        (FAILED_PER_ACCOUNT, body.username, "for this account"),
        (FAILED_PER_IP, ip, "from this address"),
    ):
        left = await rt.limiter.peek(rule, subject)
        if not left.allowed:
            raise Problem(
                429,
                f"too many failed logins {whose}; retry after the Retry-After delay",
                slug="rate-limited",
                headers=rate_limit_headers(left),
            )
    async with rt.db.shard_for(body.username) as conn:
        row = await conn.fetchrow(
            "SELECT id, password_hash FROM arena_users WHERE username = $1", body.username
        )
    if row is None:
        await rt.passwords.verify_absent(body.password)  # same cost as a wrong password
    if row is None or not await rt.passwords.verify(row["password_hash"], body.password):
        # unknown names count too: the answer must not tell them apart
        await rt.limiter.check_many(
            [(FAILED_PER_ACCOUNT, body.username, 1), (FAILED_PER_IP, ip, 1)]
        )
        raise Problem(401, _BAD_LOGIN, slug="bad-credentials")
    issued = await rt.refresh.issue(body.username)
    return _tokens(rt, int(row["id"]), body.username, issued.token)


@router.post("/refresh", response_model=TokensOut)
async def refresh(body: RefreshIn, rt: RuntimeDep) -> TokensOut:
    rotated = await rt.refresh.rotate(body.refresh_token)
    username = str(rotated.user_id)
    async with rt.db.shard_for(username) as conn:
        user_id = await conn.fetchval("SELECT id FROM arena_users WHERE username = $1", username)
    if user_id is None:
        raise Problem(401, "the account no longer exists", slug="unauthenticated")
    return _tokens(rt, int(user_id), username, rotated.token)


@router.post("/logout", status_code=204)
async def logout(body: RefreshIn, rt: RuntimeDep) -> Response:
    await rt.refresh.revoke(body.refresh_token)  # unknown tokens: nothing to end, still 204
    return Response(status_code=204)


def _tokens(rt: Runtime, user_id: int, username: str, refresh_token: str) -> TokensOut:
    access = rt.tokens.issue(str(user_id), name=username)
    return TokensOut(
        access_token=access, refresh_token=refresh_token, expires_in=int(rt.tokens.ttl_s)
    )


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"
