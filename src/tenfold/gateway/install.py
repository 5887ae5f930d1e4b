"""`install(app)`: put tenfold in front of a FastAPI or Starlette app.

app = FastAPI()
runtime = tenfold.install(app)          # or install(app, Runtime(settings))

adds:
- `TenfoldMiddleware` (request id, body bound, auth, rate limits, admission, metrics)
- problem-response handlers for tenfold errors, HTTP errors and validation errors
- `/ws`: the realtime hub's WebSocket endpoint (docs/realtime.md)
- `GET /healthz` (the process is alive), `GET /readyz` (200 while this process
  can serve: catalog, at least one shard (`readiness_shards`), cache and broker;
  else 503; per-shard health and breaker state in the body), `GET /metrics`
  (Prometheus text format)
- the lifespan: `runtime.start()` before the app's own start-up, `runtime.stop()`
  after its shutdown (consumers stop, the outbox drains, pools close)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from tenfold.errors import TenfoldError
from tenfold.gateway import problems
from tenfold.gateway.heap import tune_gc
from tenfold.gateway.middleware import WS_PATH, TenfoldMiddleware
from tenfold.gateway.runtime import Runtime
from tenfold.observe.metrics import REGISTRY
from tenfold.realtime.endpoint import route as realtime_route
from tenfold.realtime.wire import STATE_KEY

__all__ = ["install", "runtime_of"]


def install(app: Starlette, runtime: Runtime | None = None) -> Runtime:
    """Wire tenfold into `app`; returns the runtime (also at `app.state.tenfold`).

    Call it before the app starts serving. Works for FastAPI (a Starlette subclass).
    """
    runtime = runtime or Runtime()
    app.state.tenfold = runtime
    app.add_middleware(TenfoldMiddleware, runtime=runtime)
    app.add_exception_handler(HTTPException, problems.handle)
    app.add_exception_handler(TenfoldError, problems.handle)
    app.add_exception_handler(Exception, problems.handle)
    app.add_exception_handler(405, _method_not_allowed)
    _validation_handler(app)

    async def healthz(request: Request) -> Response:
        return Response(b'{"alive":true}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        report = await runtime.readiness()
        status = 200 if report["ready"] else 503
        headers = {} if report["ready"] else {"Retry-After": "5"}
        return Response(
            orjson.dumps(report), status_code=status, media_type="application/json", headers=headers
        )

    async def metrics(request: Request) -> Response:
        runtime.sample_pools()
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    for path, endpoint in (("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics)):
        app.add_route(path, endpoint, methods=["GET"], include_in_schema=False)

    app.router.routes.append(realtime_route(runtime.realtime, WS_PATH))

    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        await runtime.start()
        try:
            async with inner(a) as state:
                # after the app's own start-up, so its heap is frozen too
                tune_gc(runtime.settings.gc_gen0_threshold)
                # tenfold's uvicorn WebSocket protocol finds the hub here (realtime/wire.py)
                yield {**(state or {}), STATE_KEY: (WS_PATH, runtime.realtime)}
        finally:
            await runtime.stop()

    app.router.lifespan_context = lifespan
    return runtime


def runtime_of(request: Request) -> Runtime:
    """The runtime `install` attached to the request's app."""
    runtime: Runtime | None = request.scope.get("tenfold.runtime")  # set by the middleware
    return runtime if runtime is not None else request.app.state.tenfold


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    """A 405 whose `Allow` lists every method the path serves (RFC 9110 §15.5.6).

    Starlette answers from the first route whose path matched, so when one path
    has a route per method (arena's GET and POST `/rooms/{id}/messages`), its
    `Allow` names one method of two.
    """
    allowed: set[str] = set()
    for route in request.app.router.routes:
        methods = getattr(route, "methods", None)
        if methods and route.matches(request.scope)[0] is not Match.NONE:
            allowed |= methods
    headers = {"Allow": ", ".join(sorted(allowed))} if allowed else getattr(exc, "headers", None)
    request_id = request.scope.get("tenfold.request_id")
    return problems.problem_response(
        405,
        f"{request.method} is not allowed here; see the Allow header",
        headers=headers,
        **({"request_id": request_id} if request_id else {}),
    )


def _validation_handler(app: Starlette) -> None:
    """FastAPI's 422 for bad bodies and parameters, as a problem with the error list."""
    try:
        from fastapi.exceptions import RequestValidationError
    except ImportError:  # a plain Starlette app has no request validation
        return

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()[:20]
        ]
        return problems.problem_response(
            422,
            "the request does not match the API schema; see errors",
            errors=errors,
            request_id=request.scope.get("tenfold.request_id"),
        )

    app.add_exception_handler(RequestValidationError, invalid)
