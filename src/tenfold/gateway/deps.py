"""Request-level helpers for handlers: the caller, the runtime, per-route limits.

@app.post("/rooms/{room_id}/messages")
async def send(room_id: int, user: CurrentUser, rt: RuntimeDep): ...

`CurrentUser` answers 401 (with the reason the token was refused) when the
request is not authenticated; the token was verified once by the middleware.
A route hot enough for FastAPI's per-dependency cost to show can take
`request: Request` and call `user_of(request)` / `runtime_of(request)`: same
checks, no dependency resolution (arena's send-message does).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import Request

from tenfold.gateway.install import runtime_of
from tenfold.gateway.problems import Problem
from tenfold.gateway.runtime import Principal, Runtime
from tenfold.limits import headers as rate_limit_headers

__all__ = [
    "CurrentUser",
    "RuntimeDep",
    "current_runtime",
    "current_user",
    "rate_limit",
    "user_of",
]


def user_of(request: Request) -> Principal:
    """The authenticated principal, or a 401 problem saying why not."""
    principal = request.scope.get("tenfold.principal")
    if isinstance(principal, Principal):
        return principal
    reason = request.scope.get("tenfold.auth_error") or "this endpoint needs a Bearer access token"
    raise Problem(401, str(reason), headers={"WWW-Authenticate": 'Bearer realm="tenfold"'})


# Dependencies are `async def` on purpose: FastAPI runs a plain `def`
# dependency in its thread pool, two thread hops per request for nothing.
async def current_user(request: Request) -> Principal:
    """`user_of` as a dependency."""
    return user_of(request)


async def current_runtime(request: Request) -> Runtime:
    """The request's runtime, as a dependency (see `runtime_of`)."""
    return runtime_of(request)


CurrentUser = Annotated[Principal, Depends(current_user)]
RuntimeDep = Annotated[Runtime, Depends(current_runtime)]


async def rate_limit(request: Request, rule: str, subject: str, cost: int = 1) -> None:
    """Check `subject` against the named rule; a refusal is a 429 problem."""
    runtime = runtime_of(request)
    decision = await runtime.limiter.check(rule, subject, cost)
    if not decision.allowed:
        raise Problem(
            429,
            f"rate limit {rule!r} reached; retry after the Retry-After delay",
            headers=rate_limit_headers(decision),
        )
