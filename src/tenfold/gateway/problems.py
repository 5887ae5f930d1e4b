"""RFC 9457 problem responses, and the mapping from tenfold's typed errors to them.

Every error a client can see leaves as `application/problem+json`:
``{"type", "title", "status", "detail", "instance", ...extensions}``. The
`type` is a stable URI under `PROBLEM_BASE` so clients branch on it, never on
the prose. Server-side faults (a bug, a misconfiguration) say only "internal
error" and the request id; the full error goes to the log, never to the client.

The `detail` of a mapped tenfold error is a fixed sentence per error class
(`_client_text`), never `str(exc)`: a `QueryError`'s message carries the
driver's text (constraint names, key values, SQL), a `BrokerUnavailable`'s the
broker URL. Only the `reason` of an error whose class sets `http_status`
(`AuthError`, `InvalidValue`: written to be shown) and `Problem.detail`,
written by the app, reach the client verbatim; 4xx data errors are logged
with their full text and the request id.

Mapping of tenfold errors (see `status_of`):
- `Overloaded`, `ShardUnavailable`, `ShardTimeout`, `CircuitOpen`, `BulkheadFull`,
  `BrokerUnavailable`, `DeadlineExceeded` → 503 with `Retry-After`
- `ConstraintViolation` → 409; `PayloadError`, `CacheError` → 422
- an error with an integer `http_status` attribute (auth errors) → that status
- `Problem` (raised by app code) → its own status, title and extensions
- anything else → 500
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from tenfold.errors import (
    BrokerUnavailable,
    BulkheadFull,
    CacheError,
    CircuitOpen,
    ConstraintViolation,
    DeadlineExceeded,
    Overloaded,
    PayloadError,
    ShardTimeout,
    ShardUnavailable,
    SlotMoved,
)

__all__ = ["PROBLEM_BASE", "Problem", "problem_response", "response_for", "status_of"]

log = logging.getLogger("tenfold.gateway")

PROBLEM_BASE = "https://tenfold.dev/problems/"
MEDIA_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}
_SLUGS = {
    400: "bad-request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "too-large",
    415: "unsupported-media-type",
    422: "invalid",
    429: "rate-limited",
    500: "internal",
    503: "unavailable",
}
_UNAVAILABLE = (
    Overloaded,
    ShardUnavailable,
    ShardTimeout,
    SlotMoved,
    CircuitOpen,
    BulkheadFull,
    BrokerUnavailable,
    DeadlineExceeded,
)


class Problem(Exception):
    """Raise from a handler to answer with a problem response.

    Args:
        status: the HTTP status.
        detail: what went wrong for this request, safe to show the client.
        slug: the last part of the problem `type` URI (default: from the status).
        title: a short summary of the problem type (default: from the status).
        headers: extra response headers (e.g. `Retry-After`).
        extensions: extra members of the problem object.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug or _SLUGS.get(status, str(status))
        self.title = title or _TITLES.get(status, "Error")
        self.headers = dict(headers or {})
        self.extensions = extensions


def problem_response(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> Response:
    """An `application/problem+json` response."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (slug or _SLUGS.get(status, str(status))),
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return Response(
        orjson.dumps(body, default=str),
        status_code=status,
        headers=dict(headers or {}),
        media_type=MEDIA_TYPE,
    )


def _retry_after(exc: BaseException) -> str:
    seconds = getattr(exc, "retry_after_s", None) or getattr(exc, "retry_in_s", None) or 1.0
    return str(max(1, math.ceil(seconds)))


def status_of(exc: BaseException) -> int:
    """The HTTP status for `exc` (see the module docstring)."""
    if isinstance(exc, Problem):
        return exc.status
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, _UNAVAILABLE):
        return 503
    if isinstance(exc, ConstraintViolation):
        return 409
    if isinstance(exc, PayloadError | CacheError):
        return 422
    status = getattr(exc, "http_status", None)
    if isinstance(status, int) and 400 <= status < 600:
        return status
    return 500


def response_for(exc: BaseException, request_id: str | None = None) -> Response:
    """The problem response for `exc`; a 500 hides the error and logs it."""
    status = status_of(exc)
    extra: dict[str, Any] = {}
    if request_id:
        extra["request_id"] = request_id
    if isinstance(exc, Problem):
        return problem_response(
            exc.status,
            exc.detail,
            slug=exc.slug,
            title=exc.title,
            headers=exc.headers,
            **exc.extensions,
            **extra,
        )
    if isinstance(exc, HTTPException):
        return problem_response(
            status, str(exc.detail), headers=getattr(exc, "headers", None), **extra
        )
    if status == 503:
        return problem_response(
            503,
            _client_text(exc),
            slug="overloaded" if isinstance(exc, Overloaded) else "unavailable",
            headers={"Retry-After": _retry_after(exc)},
            **extra,
        )
    if status == 500:
        log.error("unhandled error (request %s)", request_id, exc_info=exc)
        return problem_response(
            500, "the server failed to handle this request; quote the request_id", **extra
        )
    reason = _safe_reason(exc)
    if reason is not None:
        headers = getattr(exc, "headers", None)
        slug = str(getattr(exc, "slug", "") or "") or None
        return problem_response(status, reason, slug=slug, headers=headers, **extra)
    # A data or payload error that a request provoked: the client gets a fixed
    # sentence, the operator the driver's own words.
    log.warning("request %s answered %d: %s", request_id, status, exc)
    return problem_response(status, _client_text(exc), **extra)


def _safe_reason(exc: BaseException) -> str | None:
    """`exc.reason` when its class promises it is written for clients, else None.

    The promise is a class-level `http_status` (`AuthError`, `InvalidValue`):
    such an error carries its own answer. Other errors may have a `reason` too
    (`ShardUnavailable.reason` is the driver's), which must not leave.
    """
    if not isinstance(getattr(type(exc), "http_status", None), int):
        return None
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) and reason else None


# What a client may read about each mapped error: fixed sentences, never `str(exc)`.
_CLIENT_TEXT: tuple[tuple[type[BaseException], str], ...] = (
    (
        Overloaded,
        "the service is at capacity and did not run this request; retry after Retry-After",
    ),
    (CircuitOpen, "a dependency of this request is failing; retry after Retry-After"),
    (BulkheadFull, "a dependency of this request is busy; retry after Retry-After"),
    (BrokerUnavailable, "the event broker is unreachable; retry after Retry-After"),
    (DeadlineExceeded, "this request ran past its deadline and was cancelled; retry later"),
    (
        ConstraintViolation,
        "the request conflicts with data already stored (a duplicate, or a reference to "
        "something missing); nothing was changed",
    ),
    (PayloadError, "the request produced an event that is too large or not serialisable"),
    (CacheError, "the request produced a value that is too large or not serialisable"),
)


def _client_text(exc: BaseException) -> str:
    """What a client may read about `exc`: our own sentences, never the error's text."""
    if isinstance(exc, ShardUnavailable | ShardTimeout):
        # names the shard but not its URL (nor the driver's reason): that is for operators
        return f"the data for this request is temporarily unreachable ({exc.shard}); retry later"
    for kind, text in _CLIENT_TEXT:
        if isinstance(exc, kind):
            return text
    return _TITLES.get(status_of(exc), "Error")


async def handle(request: Request, exc: Exception) -> Response:
    """A Starlette exception handler answering with `response_for`."""
    return response_for(exc, request.scope.get("tenfold.request_id"))
