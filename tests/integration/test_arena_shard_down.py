"""A dead shard: its users get a quick 503 with Retry-After; everyone else is served."""

from __future__ import annotations

import time
from typing import Any

import httpx

from apps.arena.app import create_app
from tenfold.config import ShardSpec
from tenfold.keyspace import slot_of

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
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["shard:s1"]["ok"] is False
        assert ready.json()["checks"]["shard:s0"]["ok"] is True
