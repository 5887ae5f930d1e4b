"""One pure-ASGI middleware for the whole request path.

    request id → body-size bound → authentication (Bearer JWT, verified once)
    → rate limits (the rules that name the request's route: `rule_routes.py`)
    → admission (user, anonymous; the probes in CRITICAL_PATHS bypass it)
    → the app → RED metrics, `X-Request-Id` and `RateLimit-*` headers

A request refused before routing (rate limit, shed) is still labelled by its
route template in the metrics, and sheds are logged, at most one line per
route per second (`ShedLog`).

It is one class rather than a stack of `BaseHTTPMiddleware`s because every
layer of those costs a task and a queue per request, and the issue's budget
for the whole stack is 30% of a bare endpoint. A refusal at any step is a
problem response (`tenfold.gateway.problems`); nothing after it runs.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
import weakref
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenfold.errors import Overloaded
from tenfold.gateway import metrics
from tenfold.gateway.problems import problem_response, response_for
from tenfold.gateway.rule_routes import RuleRoutes
from tenfold.gateway.shed_log import ShedLog
from tenfold.limits import header_pairs
from tenfold.limits.gcra import Decision
from tenfold.observe import tracing
from tenfold.observe.logs import request_id_var

if TYPE_CHECKING:
    from tenfold.gateway.runtime import Runtime

__all__ = ["CRITICAL_PATHS", "TenfoldMiddleware", "request_id_var"]

log = logging.getLogger("tenfold.gateway")

# Never rate limited, never shed: admission does not see them at all, so a full
# budget (requests stuck on a stalled shard) cannot fail the probes that tell
# an orchestrator the process is alive.
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
        self._rules = RuleRoutes(runtime.limiter.rules)
        # Said once: a rule written for every request before rules named their
        # routes ("per ip" alone) is now the app's own, and this line shows it.
        app_only = sorted(set(runtime.limiter.rules) - set(self._rules.names))
        log.info(
            "rate limits the gateway applies: %s; the app's own (naming no route): %s",
            ", ".join(self._rules.names) or "none",
            ", ".join(app_only) or "none",
        )
        # bound once: a labels() lookup per request costs more than the increment
        self._decisions = {
            (name, allowed): metrics.rate_limit_decisions.labels(
                name, "allowed" if allowed else "denied"
            )
            for name in runtime.limiter.rules
            for allowed in (True, False)
        }
        self._red: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.sheds = ShedLog()
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
        scope["tenfold.runtime"] = self.runtime  # runtime_of reads it here
        token = request_id_var.set(rid)
        exchange = _Exchange(send, rid)
        self.in_flight += 1
        try:
            if tracing.enabled():
                await self._traced(scope, receive, exchange)
            else:
                await self._handle(scope, receive, exchange)
        finally:
            self.in_flight -= 1
            request_id_var.reset(token)
            self._observe(scope, exchange.status, time.perf_counter() - started)

    async def _traced(self, scope: Scope, receive: Receive, exchange: _Exchange) -> None:
        carried = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope.get("method", "GET")
        with tracing.span(
            f"{method} {scope['path']}",
            {
                "http.request.method": method,
                "url.path": scope["path"],
                "tenfold.request_id": exchange.rid,
            },
            parent=tracing.extract(carried),
            kind=SpanKind.SERVER,
        ) as span:
            try:
                await self._handle(scope, receive, exchange)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", exchange.status)

    async def _handle(self, scope: Scope, receive: Receive, exchange: _Exchange) -> None:
        rid = exchange.rid
        length, too_big = self._check_length(scope)
        if too_big is not None:
            await problem_response(413, too_big, request_id=rid)(scope, receive, exchange)
            return
        # With a Content-Length (checked above) the server delivers no more than
        # that; only a chunked body has to be counted as it streams in.
        bounded = receive if length is not None else self._bounded(receive)
        if scope["path"] in CRITICAL_PATHS:
            await self.app(scope, bounded, exchange)
            return
        principal = self.runtime.authenticate(scope)
        priority = "anonymous" if principal is None else "user"
        refused = await self._rate_limit(scope, principal, exchange)
        if refused is not None:
            await problem_response(
                429,
                f"rate limit {refused!r} reached; retry after the Retry-After delay",
                request_id=rid,
            )(scope, receive, exchange)
            return
        try:
            async with self.runtime.admission.admit(priority):
                await self.app(scope, bounded, exchange)
        except Exception as exc:  # a refusal before the app answered, or an escaped error
            if exchange.started:
                raise
            if isinstance(exc, Overloaded):
                self.sheds.shed(_route_template(scope), exc)
            if isinstance(exc, _TooLarge):
                response = problem_response(
                    413, f"the request body exceeds {self.max_body} bytes", request_id=rid
                )
            else:
                response = response_for(exc, rid)
            await response(scope, receive, exchange)

    def _check_length(self, scope: Scope) -> tuple[int | None, str | None]:
        """(the Content-Length when it alone frames the body, else None; why the
        request is refused, or None)."""
        size = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return None, "the Content-Length header is not a number"
                if size > self.max_body:
                    return size, (
                        f"the request body is {size} bytes, over the {self.max_body}-byte limit"
                    )
            elif name == b"transfer-encoding":
                chunked = True  # it overrides Content-Length (RFC 9112 6.3)
        return (None if chunked else size), None

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

    async def _rate_limit(self, scope: Scope, principal: Any, exchange: _Exchange) -> str | None:
        """Count the request against the rules naming its route; the refusing rule, or None."""
        client = scope.get("client")
        checks = self._rules.checks(
            scope.get("method", "GET"),
            scope["path"],
            principal.subject if principal is not None else None,
            client[0] if client else "unknown",
        )
        if not checks:
            return None
        limiter = self.runtime.limiter
        if len(checks) == 1:
            # in-process storage answers without a coroutine; Redis is awaited
            name, subject = checks[0]
            only = limiter.check_now(name, subject)
            if only is None:
                only = await limiter.check(name, subject)
            results = [only]
        else:
            results = await limiter.check_many([(name, subject, 1) for name, subject in checks])
        exchange.decision = min(results, key=_tightness) if len(results) > 1 else results[0]
        refused = None
        for (name, _), result in zip(checks, results, strict=True):
            self._decisions[name, result.allowed].inc()
            if not result.allowed and refused is None:
                refused = name
        return refused

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        template = getattr(scope.get("route"), "path", None)
        if template is None:  # refused before routing, or a Starlette route (the probes)
            template = _route_template(scope)
        key = (scope.get("method", "GET"), template, status)
        found = self._red.get(key)
        if found is None:  # bounded: methods x route templates x status codes
            method = key[0]
            found = self._red[key] = (
                metrics.http_seconds.labels(method, template),
                metrics.http_requests.labels(method, template, str(status)),
            )
        found[0].observe(seconds)
        found[1].inc()


class _Exchange:
    """One request's response side, passed on as the app's `send`: it records the
    status and whether the response started, and adds `X-Request-Id` and the
    `RateLimit-*` headers of the request's tightest rate-limit decision."""

    __slots__ = ("decision", "rid", "send", "started", "status")

    def __init__(self, send: Send, rid: str) -> None:
        self.send = send
        self.rid = rid
        self.status = 500
        self.started = False
        self.decision: Decision | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            hdrs = list(message.get("headers", ()))
            hdrs.append((b"x-request-id", self.rid.encode()))
            if self.decision is not None:
                hdrs.extend(header_pairs(self.decision))
            message = {**message, "headers": hdrs}
        await self.send(message)


def _route_template(scope: Scope) -> str:
    """The template of the route `scope` would reach, for a request refused before
    routing; the probes by their path; "unmatched" when no route matches.
    Only refusals, 404s and Starlette routes pay for the scan."""
    path: str = scope["path"]
    if path in CRITICAL_PATHS:
        return path
    app = scope.get("app")
    partial = None
    for route in getattr(getattr(app, "router", None), "routes", ()):
        template = getattr(route, "path", None)
        if template is None:
            continue
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(template)
        if match is Match.PARTIAL and partial is None:
            partial = str(template)
    return partial or "unmatched"


def _tightness(decision: Decision) -> tuple[bool, int]:
    return decision.allowed, decision.remaining


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if _GOOD_ID.fullmatch(text):
                return text
            break
    # Unique, not secret: a seeded PRNG rather than a syscall per request.
    return f"{_ids.getrandbits(128):032x}"


_ids = random.Random()  # seeded from os.urandom; re-seeded in forked children
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.seed)
