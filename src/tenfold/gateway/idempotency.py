"""The `Idempotency-Key` request header (IETF draft-ietf-httpapi-idempotency-key-header).

    @router.post("/things", openapi_extra=idempotency_openapi())
    async def create(body: ThingIn, user: CurrentUser, request: Request) -> ThingOut:
        key = idempotency_key(request)          # str | None; a bad key is a 422 problem

Why not a FastAPI `Header()` parameter: FastAPI resolves header parameters
through its generic machinery on every request (about 115 Python calls for
one optional header, measured with cProfile against arena's send-message
route); this reads the one header straight from the ASGI scope. The route
still documents the header in its OpenAPI schema through `openapi_extra`.
"""

from __future__ import annotations

import re
from typing import Any, Literal, overload

from starlette.requests import HTTPConnection

from tenfold.gateway.problems import Problem

__all__ = ["HEADER", "KEY_PATTERN", "idempotency_key", "idempotency_openapi"]

HEADER = "Idempotency-Key"
KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
_RAW = HEADER.lower().encode()
_KEY = re.compile(KEY_PATTERN)


@overload
def idempotency_key(request: HTTPConnection, *, required: Literal[True]) -> str: ...
@overload
def idempotency_key(request: HTTPConnection, *, required: bool = False) -> str | None: ...
def idempotency_key(request: HTTPConnection, *, required: bool = False) -> str | None:
    """The request's key, checked against `KEY_PATTERN`; a 422 problem when it is
    malformed, or missing and `required`."""
    for name, value in request.scope["headers"]:
        if name == _RAW:
            key: str = value.decode("latin-1")
            if _KEY.fullmatch(key) is None:
                raise Problem(
                    422,
                    f"the {HEADER} header must be 1-64 letters, digits or . _ : -",
                    slug="bad-idempotency-key",
                )
            return key
    if required:
        raise Problem(
            422,
            f"this endpoint needs an {HEADER} header (1-64 letters, digits or . _ : -)",
            slug="missing-idempotency-key",
        )
    return None


def idempotency_openapi(*, required: bool = False) -> dict[str, Any]:
    """`openapi_extra` documenting the header on a route."""
    return {
        "parameters": [
            {
                "name": HEADER,
                "in": "header",
                "required": required,
                "schema": {"type": "string", "pattern": KEY_PATTERN},
                "description": "Retries with the same key return the first answer.",
            }
        ]
    }
