"""The gateway over HTTP: health, readiness, metrics, request ids, rate limits,
problem responses, body bounds and admission, on a tiny FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.requests import Request

from tenfold.config import Settings, ShardSpec
from tenfold.gateway import Runtime, install
from tests.integration.arena_support import assert_problem, running_app, sqlite_settings
from tests.integration.support import free_port

SECRET_TEXT = "kaboom-secret-internal-detail-1234"


class Item(BaseModel):
    name: str
    qty: int


def tiny_app(settings: Settings) -> FastAPI:
    app = FastAPI()
    install(app, Runtime(settings))

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, Any]:
        return {"id": item_id}

    @app.post("/items")
    async def post_item(item: Item) -> dict[str, Any]:
        return item.model_dump()

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(SECRET_TEXT)

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(0.6)
        return {"ok": True}

    return app


@contextlib.asynccontextmanager
async def served(tmp_path: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = sqlite_settings(tmp_path / "gw", **overrides)
    async with running_app(tiny_app(settings)) as client:
        yield client


async def test_healthz_and_readyz_list_every_shard(tmp_path: Path) -> None:
    async with served(tmp_path, shards=3) as client:
        r = await client.get("/healthz")
        assert r.status_code == 200
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ready"] is True
        shards = {k for k in body["checks"] if k.startswith("shard:")}
        assert shards == {"shard:s0", "shard:s1", "shard:s2"}
        assert all(body["checks"][k]["ok"] for k in shards)


async def test_readyz_503_when_a_shard_is_unreachable(tmp_path: Path) -> None:
    # Under the "all" policy; the default ("any") stays ready with one shard down
    # (tests/integration/test_arena_shard_down.py).
    base = tmp_path / "gw"
    settings = sqlite_settings(
        base, shards=1, connect_timeout_s=0.5, drain_timeout_s=0.2, readiness_shards="all"
    )
    dead = ShardSpec(name="dead", url=f"postgresql://u:p@127.0.0.1:{free_port()}/nothing")
    settings = settings.model_copy(update={"shards": [*settings.shards, dead]})
    app = tiny_app(settings)
    async with running_app(app, do_migrate=False) as client:
        r = await client.get("/readyz")
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0
        checks = r.json()["checks"]
        assert checks["shard:s0"]["ok"] is True
        assert checks["shard:dead"]["ok"] is False
        assert checks["shard:dead"]["error"]
        assert "u:p@" not in r.text  # the password never leaves
        assert (await client.get("/healthz")).status_code == 200


async def test_metrics_label_by_route_template(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        for n in (101, 202, 303):
            assert (await client.get(f"/items/{n}")).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/no/such/path")).status_code == 404
        text = (await client.get("/metrics")).text
    lines = [ln for ln in text.splitlines() if ln.startswith("tenfold_http_requests_total{")]
    assert any('route="/items/{item_id}"' in ln and 'status="200"' in ln for ln in lines), lines
    # the probes by their path, not "unmatched"; a path with no route is "unmatched"
    assert any('route="/healthz"' in ln and 'status="200"' in ln for ln in lines), lines
    assert any('route="unmatched"' in ln and 'status="404"' in ln for ln in lines), lines
    assert not any("/items/101" in ln for ln in lines)
    counted = [
        float(ln.rsplit(" ", 1)[1])
        for ln in lines
        if 'route="/items/{item_id}"' in ln and 'method="GET"' in ln and 'status="200"' in ln
    ]
    assert counted and counted[0] >= 3


async def test_request_id_echoed_or_generated(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        r = await client.get("/items/1", headers={"X-Request-Id": "abc-123.def:9"})
        assert r.headers["x-request-id"] == "abc-123.def:9"
        r1 = await client.get("/items/1")
        r2 = await client.get("/items/1")
        assert re.fullmatch(r"[0-9a-f]{32}", r1.headers["x-request-id"])
        assert r1.headers["x-request-id"] != r2.headers["x-request-id"]
        for bad in ("has space", "x" * 65, "semi;colon", "<script>"):
            r = await client.get("/items/1", headers={"X-Request-Id": bad})
            got = r.headers["x-request-id"]
            assert got != bad and re.fullmatch(r"[0-9a-f]{32}", got)
        # problem bodies carry the same id
        r = await client.get("/nowhere", headers={"X-Request-Id": "trace-42"})
        assert r.headers["x-request-id"] == "trace-42"
        assert r.json()["request_id"] == "trace-42"


async def test_rate_limit_headers_and_429(tmp_path: Path) -> None:
    async with served(tmp_path, rate_limits={"ip": "3/minute burst 3 per ip on *"}) as client:
        first = await client.get("/items/1")
        assert first.status_code == 200
        for name in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
            assert name in first.headers, first.headers
        remaining = [int(first.headers["ratelimit-remaining"])]
        statuses = [first.status_code]
        for _ in range(5):
            r = await client.get("/items/1")
            statuses.append(r.status_code)
            if r.status_code == 200:
                remaining.append(int(r.headers["ratelimit-remaining"]))
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429, 429], statuses
        assert remaining == sorted(remaining, reverse=True) and remaining[-1] < remaining[0]
        body = assert_problem(r, 429)
        assert int(r.headers["retry-after"]) >= 1
        assert body["request_id"] == r.headers["x-request-id"]
        # probes are never rate limited
        assert (await client.get("/healthz")).status_code == 200


async def test_problem_bodies_for_404_405_422(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        assert_problem(await client.get("/no/such/path"), 404)
        assert_problem(await client.delete("/items/1"), 405)
        assert_problem(await client.get("/items/not-a-number"), 422)
        body = assert_problem(await client.post("/items", json={"name": "x"}), 422)
        assert body["errors"] and body["errors"][0]["loc"] == ["body", "qty"]
        assert_problem(
            await client.post(
                "/items", content=b"{nope", headers={"content-type": "application/json"}
            ),
            422,
        )


async def test_unexpected_exception_is_a_bare_500_problem(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        r = await client.get("/boom", headers={"X-Request-Id": "boom-1"})
    body = assert_problem(r, 500)
    assert body["request_id"] == "boom-1"
    assert SECRET_TEXT not in r.text
    assert "RuntimeError" not in r.text and "Traceback" not in r.text
    assert "line " not in r.text


async def test_oversize_body_by_content_length_is_413(tmp_path: Path) -> None:
    async with served(tmp_path, max_body_bytes=1024) as client:
        ok = await client.post("/raw", content=b"a" * 1000)
        assert ok.status_code == 200 and ok.json() == {"size": 1000}
        assert_problem(await client.post("/raw", content=b"a" * 1025), 413)
        r = await client.post("/raw", content=b"a", headers={"content-length": "nope"})
        assert r.status_code in (400, 413) and r.status_code < 500


async def test_oversize_chunked_body_is_413(tmp_path: Path) -> None:
    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"b" * 300

    async with served(tmp_path, max_body_bytes=1024) as client:
        small = await client.post("/raw", content=chunks(3))
        assert small.request.headers.get("content-length") is None
        assert small.status_code == 200 and small.json() == {"size": 900}
        big = await client.post("/raw", content=chunks(20))
        assert big.request.headers.get("content-length") is None
        assert_problem(big, 413)
        # a model-bound endpoint reading a chunked body: also 413, not 400/500
        big = await client.post(
            "/items", content=chunks(20), headers={"content-type": "application/json"}
        )
        assert_problem(big, 413)


async def test_admission_sheds_with_503_while_healthz_answers(tmp_path: Path) -> None:
    overrides = {
        "admission_initial_limit": 2,
        "admission_max_limit": 2,
        "admission_max_queue": 0,
        "admission_max_wait_s": 0.01,
    }
    async with served(tmp_path, **overrides) as client:
        tasks = [asyncio.create_task(client.get("/slow")) for _ in range(8)]
        await asyncio.sleep(0.15)  # the admitted ones are now sleeping in the handler
        health = await client.get("/healthz")
        results = await asyncio.gather(*tasks)
    assert health.status_code == 200
    statuses = sorted(r.status_code for r in results)
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) <= {200, 503}, statuses
    shed = [r for r in results if r.status_code == 503]
    for r in shed:
        assert_problem(r, 503)
        assert float(r.headers["retry-after"]) > 0
    assert len(shed) >= 8 - 2


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_are_not_in_the_openapi_schema(tmp_path: Path, path: str) -> None:
    async with served(tmp_path) as client:
        schema = (await client.get("/openapi.json")).json()
    assert path not in schema["paths"]
