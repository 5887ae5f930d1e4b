"""Shedding (issue 13): probes are never shed, even with the admission budget full;
shed requests are labelled by route and logged (rate-limited); logins queue at
the password hasher instead of being shed by admission."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tenfold.config import Settings
from tenfold.gateway import Runtime, install
from tenfold.gateway.auth import TESTING, PasswordHasher
from tenfold.observe.metrics import REGISTRY
from tests.integration.arena_support import (
    PASSWORD,
    assert_problem,
    running_app,
    running_arena,
    sqlite_settings,
)

# One slot for everyone and no queue: one request in flight fills the budget.
FULL_AT_ONE = {"admission_initial_limit": 1, "admission_max_queue": 0}


@contextlib.asynccontextmanager
async def held_app(
    tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, asyncio.Event]]:
    settings: Settings = sqlite_settings(tmp_path / "gw", **overrides)
    app = FastAPI()
    install(app, Runtime(settings))
    release = asyncio.Event()

    @app.get("/held/{n}")
    async def held(n: int) -> dict[str, int]:
        await release.wait()
        return {"n": n}

    async with running_app(app) as client:
        yield client, release


def _count(route: str, status: str) -> float:
    value = REGISTRY.get_sample_value(
        "tenfold_http_requests_total", {"method": "GET", "route": route, "status": status}
    )
    return value or 0.0


async def _fill(client: httpx.AsyncClient, runtime: Runtime) -> asyncio.Task[httpx.Response]:
    holder = asyncio.create_task(client.get("/held/1"))
    deadline = time.monotonic() + 5
    while runtime.admission.in_flight < 1:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the holder was never admitted"
        await asyncio.sleep(0.01)
    return holder


async def test_probes_answer_with_the_admission_budget_full(tmp_path: Path) -> None:
    async with held_app(tmp_path, **FULL_AT_ONE) as (client, release):
        runtime = client._transport.app.state.tenfold  # type: ignore[attr-defined]
        holder = await _fill(client, runtime)
        assert_problem(await client.get("/held/2"), 503)  # the budget is really full
        for probe in ("/healthz", "/readyz", "/metrics"):
            r = await client.get(probe)
            assert r.status_code == 200, (probe, r.status_code, r.text[:200])
        release.set()
        assert (await holder).status_code == 200


async def test_shed_requests_are_labelled_by_route_and_logged_once_per_second(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with held_app(tmp_path, **FULL_AT_ONE) as (client, release):
        runtime = client._transport.app.state.tenfold  # type: ignore[attr-defined]
        holder = await _fill(client, runtime)
        before = _count("/held/{n}", "503"), _count("unmatched", "503")
        with caplog.at_level(logging.WARNING, logger="tenfold.gateway"):
            for n in range(2, 12):
                assert_problem(await client.get(f"/held/{n}"), 503)
            lines = [r.getMessage() for r in caplog.records if "shed" in r.getMessage()]
            assert lines == [
                "shed 1 request(s) to /held/{n} with 503: admission limit 1, 1 in flight "
                "(anonymous class)"
            ]
            await asyncio.sleep(1.2)  # the rest come as one counted line
            lines = [r.getMessage() for r in caplog.records if "shed" in r.getMessage()]
            assert len(lines) == 2 and lines[1].startswith("shed 9 request(s) to /held/{n}")
        after = _count("/held/{n}", "503"), _count("unmatched", "503")
        assert after[0] - before[0] == 10
        assert after[1] == before[1]
        release.set()
        assert (await holder).status_code == 200


async def test_forty_logins_at_once_queue_for_the_hasher_instead_of_being_shed(
    tmp_path: Path,
) -> None:
    """Each login holds the hasher 0.1 s, two at a time: admission (4 anonymous slots,
    a 1 s wait) used to shed the logins queued behind it; now they wait at the hasher."""
    settings = sqlite_settings(
        tmp_path / "arena",
        admission_initial_limit=8,
        admission_max_wait_s=1.0,
        rate_limits={"ip": "1000000/minute burst 100000 per ip"},
    )
    async with running_arena(settings) as arena:
        names = [f"user{i}" for i in range(40)]
        for name in names:
            assert (await arena.register(name)).status_code == 201

        class SlowHasher(PasswordHasher):
            def _verify(self, hash: str, password: str) -> bool:
                time.sleep(0.1)  # in the hasher's thread: argon2 with production costs
                return super()._verify(hash, password)

        arena.runtime.passwords = SlowHasher(TESTING, max_concurrent=2, max_wait_s=10)
        results = await asyncio.gather(*(arena.login(n, PASSWORD) for n in names))
        statuses = [r.status_code for r in results]
        assert statuses == [200] * 40, statuses
