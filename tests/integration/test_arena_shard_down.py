"""A dead shard: its users get a quick 503 with Retry-After; everyone else is served."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import asyncpg
import httpx
import pytest

from apps.arena.app import create_app
from tenfold.config import ShardSpec
from tenfold.ids import slot_of_id
from tenfold.keyspace import slot_of
from tests.integration.support import free_port

PASSWORD = "correct horse"


def _names_on_each_shard(app: Any) -> dict[str, str]:
    """One user name per shard, found by the router's own placement."""
    topology = app.state.tenfold.db.topology
    found: dict[str, str] = {}
    n = 0
    while len(found) < len(app.state.tenfold.db.shard_names):
        name = f"user{n}"
        found.setdefault(topology.shard_of(slot_of(name)), name)
        n += 1
    return found


async def test_dead_shard_answers_503_and_other_shards_serve(
    make_settings: Any, backend: str
) -> None:
    settings = make_settings(
        shards=2, password_profile="testing", connect_timeout_s=0.5, pool_acquire_timeout_s=1.0
    )
    app = create_app(settings)
    rt = app.state.tenfold
    await rt.db.open()
    await rt.db.migrate()
    users = _names_on_each_shard(app)
    await rt.db.close()
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        for name in users.values():
            reply = await client.post(
                "/auth/register", json={"username": name, "password": PASSWORD}
            )
            assert reply.status_code == 201, reply.text

    # s1 goes away: the same topology, but its database cannot be reached
    dead = (
        "postgresql://postgres@127.0.0.1:1/gone"
        if backend == "postgres"
        else ("sqlite:////dev/null/nonexistent/shard1.db")
    )
    shards = [s if s.name != "s1" else ShardSpec(name="s1", url=dead) for s in settings.shards]
    app2 = create_app(settings.model_copy(update={"shards": shards}))
    async with app2.router.lifespan_context(app2):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app2), base_url="http://t")
        alive = await client.post(
            "/auth/login", json={"username": users["s0"], "password": PASSWORD}
        )
        assert alive.status_code == 200, alive.text
        started = time.monotonic()
        down = await client.post(
            "/auth/login", json={"username": users["s1"], "password": PASSWORD}
        )
        elapsed = time.monotonic() - started
        assert down.status_code == 503, down.text
        assert int(down.headers["retry-after"]) >= 1
        assert down.headers["content-type"] == "application/problem+json"
        problem = down.json()
        assert problem["status"] == 503 and "s1" in problem["detail"]
        assert "gone" not in problem["detail"] and "nonexistent" not in problem["detail"]
        assert elapsed < 5.0  # bounded by the connect and acquire timeouts, not a hang
        # This process still serves s0's users: it stays in rotation, and says
        # which shard is down (and its breaker) in the body and the metrics.
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        report = ready.json()
        assert report["ready"] is True and report["shards_up"] == "1/2"
        assert report["checks"]["catalog"]["ok"] is True
        assert report["checks"]["shard:s1"]["ok"] is False
        assert report["checks"]["shard:s1"]["breaker"] in ("closed", "open", "half_open")
        assert report["checks"]["shard:s0"]["ok"] is True
        assert report["checks"]["shard:s0"]["breaker"] == "closed"
        scrape = (await client.get("/metrics")).text
        assert 'tenfold_shard_up{shard="s1"} 0.0' in scrape
        assert 'tenfold_shard_up{shard="s0"} 1.0' in scrape

    # A policy that needs every shard answers 503 while one is down.
    strict = settings.model_copy(update={"shards": shards, "readiness_shards": "all"})
    app3 = create_app(strict)
    async with app3.router.lifespan_context(app3):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app3), base_url="http://t")
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["shards_up"] == "1/2"


# -- one of four PostgreSQL shards refuses, or stalls, under load -----------------

DEADLINE_S = 1.0  # the statement deadline (query_timeout_s) of these tests
BAD = "s3"
FAILURES: list[tuple[str, int, str]] = []  # healthy shards' failed answers, for the report


async def _setup_four_shards(settings: Any) -> tuple[dict[str, list[str]], Any]:
    """Register users until each shard holds three wallets; their access tokens by shard.

    GET /wallet routes by the user id in the token, so the shard of a token is
    the shard of that id's slot.
    """
    app = create_app(settings)
    rt = app.state.tenfold
    await rt.db.open()
    await rt.db.migrate()
    await rt.db.close()
    tokens: dict[str, list[str]] = {name: [] for name in rt.db.shard_names}
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        n = 0
        while any(len(v) < 3 for v in tokens.values()):
            body = {"username": f"load{n}", "password": PASSWORD}
            n += 1
            reply = await client.post("/auth/register", json=body)
            assert reply.status_code == 201, reply.text
            shard = rt.db.topology.shard_of_slot(slot_of_id(int(reply.json()["id"])))
            if len(tokens[shard]) < 3:
                reply = await client.post("/auth/login", json=body)
                assert reply.status_code == 200, reply.text
                tokens[shard].append(reply.json()["access_token"])
    return tokens, app


async def _load(
    app: Any, tokens: dict[str, list[str]], duration_s: float, workers: int = 16
) -> tuple[dict[str, list[tuple[int, float, str]]], list[tuple[str, int]]]:
    """`workers` closed loops of GET /wallet over every shard's users, and a prober.

    Returns (status, seconds, Retry-After) per request by shard, and the
    prober's (path, status) for /healthz and /readyz.
    """
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
    )
    results: dict[str, list[tuple[int, float, str]]] = {shard: [] for shard in tokens}
    probes: list[tuple[str, int]] = []
    shards = sorted(tokens)
    stop = time.monotonic() + duration_s

    async def worker(index: int) -> None:
        i = index
        while time.monotonic() < stop:
            shard = shards[i % len(shards)]
            token = tokens[shard][(i // len(shards)) % len(tokens[shard])]
            i += 1
            started = time.monotonic()
            reply = await client.get("/wallet", headers={"authorization": f"Bearer {token}"})
            elapsed = time.monotonic() - started
            results[shard].append(
                (reply.status_code, elapsed, reply.headers.get("retry-after", ""))
            )
            if reply.status_code != 200 and shard != BAD:
                FAILURES.append((shard, reply.status_code, reply.text[:200]))

    async def prober() -> None:
        while time.monotonic() < stop:
            for path in ("/healthz", "/readyz"):
                probes.append((path, (await client.get(path)).status_code))
            await asyncio.sleep(0.05)

    await asyncio.gather(prober(), *(worker(w) for w in range(workers)))
    return results, probes


def _assert_bad_shard_costs_only_itself(
    results: dict[str, list[tuple[int, float, str]]], probes: list[tuple[str, int]]
) -> None:
    for shard, rows in results.items():
        if shard == BAD:
            continue
        ok = sum(1 for status, _, _ in rows if status == 200)
        why = collections.Counter((s, st, t[-120:]) for s, st, t in FAILURES if s == shard)
        assert rows and ok / len(rows) >= 0.99, (shard, ok, len(rows), why.most_common(3))
        slowest = max(elapsed for _, elapsed, _ in rows)
        assert slowest < DEADLINE_S, (shard, slowest)
    bad = results[BAD]
    assert bad and all(status == 503 for status, _, _ in bad), {s for s, _, _ in bad}
    assert all(int(retry) >= 1 for _, _, retry in bad)
    # Bounded by the statement deadline (plus scheduling on a shared box), and
    # most of them refused at once by the breaker or the bulkhead.
    assert max(elapsed for _, elapsed, _ in bad) < DEADLINE_S + 1.0
    fast = sum(1 for _, elapsed, _ in bad if elapsed < 0.25)
    assert fast / len(bad) >= 0.7, (fast, len(bad))
    assert probes and all(status == 200 for path, status in probes if path == "/healthz")
    assert all(status == 200 for path, status in probes if path == "/readyz"), probes


def _four_shard_settings(make_settings: Any) -> Any:
    return make_settings(
        shards=4,
        password_profile="testing",
        query_timeout_s=DEADLINE_S,
        connect_timeout_s=0.5,
        pool_acquire_timeout_s=2.0,
    )


@pytest.mark.postgres
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_refusing_shard_costs_only_its_own_requests(make_settings: Any) -> None:
    settings = _four_shard_settings(make_settings)
    tokens, _ = await _setup_four_shards(settings)
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/gone"
    shards = [s if s.name != BAD else ShardSpec(name=BAD, url=dead) for s in settings.shards]
    app = create_app(settings.model_copy(update={"shards": shards}))
    async with app.router.lifespan_context(app):
        results, probes = await _load(app, tokens, duration_s=3.0)
    _assert_bad_shard_costs_only_itself(results, probes)


@pytest.mark.postgres
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_stalled_shard_costs_only_its_own_requests_and_is_logged(
    make_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _four_shard_settings(make_settings)
    tokens, app = await _setup_four_shards(settings)
    stalled_url = next(s.url for s in settings.shards if s.name == BAD)
    caplog.set_level(logging.WARNING, logger="tenfold.data")
    async with app.router.lifespan_context(app):
        side = await asyncpg.connect(stalled_url, timeout=5)
        try:
            # Locks held for three statement deadlines: every read of a wallet on
            # s3 waits for them until its statement_timeout cancels it.
            tx = side.transaction()
            await tx.start()
            await side.execute("LOCK TABLE arena_wallets IN ACCESS EXCLUSIVE MODE")
            results, probes = await _load(app, tokens, duration_s=3 * DEADLINE_S)
            await tx.rollback()
        finally:
            await side.close()
        _assert_bad_shard_costs_only_itself(results, probes)
        named = [r.getMessage() for r in caplog.records if r.name == "tenfold.data"]
        assert any(f"shard {BAD}" in m for m in named), named
        assert not any(f"shard s{n} " in m for n in range(3) for m in named), named
        # The locks are gone: s3 serves again once its breaker lets a probe through.
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        headers = {"authorization": f"Bearer {tokens[BAD][0]}"}
        deadline = time.monotonic() + settings.shard_breaker_open_s + 3
        while (await client.get("/wallet", headers=headers)).status_code != 200:
            assert time.monotonic() < deadline, "s3 did not recover after the locks were released"
            await asyncio.sleep(0.05)
