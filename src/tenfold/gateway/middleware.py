"""One pure-ASGI middleware for the whole request path.

    request id → body-size bound → authentication (Bearer JWT, verified once)
    → rate limits ("per user" rules when authenticated, else "per ip" rules)
    → admission (priority: critical for health probes, user, anonymous)
    → the app → RED metrics, `X-Request-Id` and `RateLimit-*` headers

It is one class rather than a stack of `BaseHTTPMiddleware`s because every
layer of those costs a task and a queue per request, and the issue's budget
for the whole stack is 30% of a bare endpoint. A refusal at any step is a
problem response (`tenfold.gateway.problems`); nothing after it runs.
"""

from __future__ import annotations

import os
import re
import time
import weakref
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenfold.gateway import metrics
from tenfold.gateway.problems import problem_response, response_for
from tenfold.limits import header_pairs
from tenfold.limits.gcra import Decision
from tenfold.observe import tracing
from tenfold.observe.logs import request_id_var
from tenfold.observe.metrics import child

if TYPE_CHECKING:
    from tenfold.gateway.runtime import Runtime

__all__ = ["CRITICAL_PATHS", "TenfoldMiddleware", "request_id_var"]

CRITICAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_GOOD_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class _TooLarge(HTTPException):
    """The streamed body passed the bound. An `HTTPException` so that FastAPI's
    body parsing re-raises it instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


WS_PATH = "/ws"  # the hub's route (`install` also mounts it on the router)


class TenfoldMiddleware:
    """The gateway middleware; `tenfold.gateway.install` adds it.

    Args:
        app: the wrapped ASGI app.
        runtime: the started runtime (limiter, admission, tokens, settings).
    """

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        gw = runtime.settings
        self.max_body = gw.max_body_bytes
        self._ip_rules = [n for n, r in runtime.limiter.rules.items() if r.scope == "ip"]
        self._user_rules = [n for n, r in runtime.limiter.rules.items() if r.scope == "user"]
        self.in_flight = 0
        # read when scraped rather than written twice per request
        me = weakref.ref(self)
        metrics.http_in_flight.set_function(lambda: float(getattr(me(), "in_flight", 0)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and scope["path"] == WS_PATH:
                # Straight to the hub: a WebSocket lives for hours, and every ASGI
                # layer it passes through keeps a frame alive for that long.
                await self.runtime.realtime.serve(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = _request_id(scope)
        scope["tenfold.request_id"] = rid
        token = request_id_var.set(rid)
        status_box = [500]
        decision: list[Decision | None] = [None]

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                hdrs = list(message.get("headers", ()))
                hdrs.append((b"x-request-id", rid.encode()))
                if decision[0] is not None:
                    hdrs.extend(header_pairs(decision[0]))
                message = {**message, "headers": hdrs}
            await send(message)

        self.in_flight += 1
        try:
            if tracing.enabled():
                await self._traced(scope, receive, send_wrapped, rid, decision, status_box)
            else:
                await self._handle(scope, receive, send_wrapped, rid, decision)
        finally:
            self.in_flight -= 1
            request_id_var.reset(token)
            self._observe(scope, status_box[0], time.perf_counter() - started)

    async def _traced(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        rid: str,
        decision: list[Decision | None],
        status_box: list[int],
    ) -> None:
        carried = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope.get("method", "GET")
        with tracing.span(
            f"{method} {scope['path']}",
            {"http.request.method": method, "url.path": scope["path"], "tenfold.request_id": rid},
            parent=tracing.extract(carried),
            kind=SpanKind.SERVER,
        ) as span:
            try:
                await self._handle(scope, receive, send, rid, decision)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status_box[0])

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        rid: str,
        decision: list[Decision | None],
    ) -> None:
        too_big = self._check_length(scope)
        if too_big is not None:
            await problem_response(413, too_big, request_id=rid)(scope, receive, send)
            return
        path = scope["path"]
        priority = "critical" if path in CRITICAL_PATHS else "anonymous"
        principal = self.runtime.authenticate(scope)
        if principal is not None:
            priority = "user"
        if priority != "critical":
            refused = await self._rate_limit(scope, principal, decision)
            if refused is not None:
                await problem_response(
                    429,
                    f"rate limit {refused!r} reached; retry after the Retry-After delay",
                    request_id=rid,
                )(scope, receive, send)
                return
        started: list[bool] = [False]

        async def send_tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            async with self.runtime.admission.admit(priority):
                await self.app(scope, self._bounded(receive), send_tracking)
        except Exception as exc:  # a refusal before the app answered, or an escaped error
            if started[0]:
                raise
            if isinstance(exc, _TooLarge):
                response = problem_response(
                    413, f"the request body exceeds {self.max_body} bytes", request_id=rid
                )
            else:
                response = response_for(exc, rid)
            await response(scope, receive, send)

    def _check_length(self, scope: Scope) -> str | None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return "the Content-Length header is not a number"
                if size > self.max_body:
                    return f"the request body is {size} bytes, over the {self.max_body}-byte limit"
        return None

    def _bounded(self, receive: Receive) -> Receive:
        seen = [0]
        limit = self.max_body

        async def bounded() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise _TooLarge(limit)
            return message

        return bounded

    async def _rate_limit(
        self, scope: Scope, principal: Any, decision: list[Decision | None]
    ) -> str | None:
        checks: list[tuple[str, str, int]] = []
        if principal is None and self._ip_rules:
            client = scope.get("client")
            ip = client[0] if client else "unknown"
            checks.extend((name, ip, 1) for name in self._ip_rules)
        if principal is not None and self._user_rules:
            checks.extend((name, principal.subject, 1) for name in self._user_rules)
        if not checks:
            return None
        limiter = self.runtime.limiter
        if len(checks) == 1:
            results = [await limiter.check(checks[0][0], checks[0][1])]
        else:
            results = await limiter.check_many(checks)
        tightest = min(results, key=lambda d: (d.allowed, d.remaining))
        decision[0] = tightest
        refused = None
        for (name, _, _), result in zip(checks, results, strict=True):
            outcome = "allowed" if result.allowed else "denied"
            child(metrics.rate_limit_decisions, name, outcome).inc()
            if not result.allowed and refused is None:
                refused = name
        return refused

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "GET")
        child(metrics.http_seconds, method, template).observe(seconds)
        child(metrics.http_requests, method, template, str(status)).inc()


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if _GOOD_ID.fullmatch(text):
                return text
            break
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID
