"""Helpers for the gateway and arena HTTP tests: a running app and a client in-process.

async with running_arena(settings) as arena:        # migrated, started, stopped
    alice = await arena.signup("alice")              # register + login
    r = await arena.client.get("/wallet", headers=alice.headers)
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import SecretStr

from apps.arena.app import create_app
from tenfold.config import Settings, ShardSpec
from tenfold.gateway import Runtime

# HS256 secret every test app is configured with, so tests can forge tokens.
SECRET = "arena-test-secret-" + "x" * 40
PASSWORD = "correct horse battery"
PROBLEM = "application/problem+json"

# Overrides that make the saga and projections settle fast and hashing cheap.
FAST = {
    "password_profile": "testing",
    "auth_secret": SecretStr(SECRET),
    "relay_poll_interval_s": 0.02,
    "consumer_initial_backoff_s": 0.02,
    "consumer_max_backoff_s": 0.2,
    "drain_timeout_s": 2.0,
}

_ids = itertools.count()


def sqlite_settings(base: Path, shards: int = 2, **overrides: Any) -> Settings:
    """Settings for `shards` SQLite shards under `base` (created), with `FAST` applied."""
    base.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "catalog_url": f"sqlite:///{base}/catalog.db",
        "shards": [
            ShardSpec(name=f"s{n}", url=f"sqlite:///{base}/shard{n}.db") for n in range(shards)
        ],
        "connect_timeout_s": 2.0,
        **FAST,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class User:
    name: str
    id: str
    access: str
    refresh: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


@dataclass
class Arena:
    app: FastAPI
    runtime: Runtime
    client: httpx.AsyncClient
    users: dict[str, User] = field(default_factory=dict)

    async def register(self, name: str, password: str = PASSWORD) -> httpx.Response:
        return await self.client.post(
            "/auth/register", json={"username": name, "password": password}
        )

    async def login(self, name: str, password: str = PASSWORD) -> httpx.Response:
        return await self.client.post("/auth/login", json={"username": name, "password": password})

    async def signup(self, name: str, password: str = PASSWORD) -> User:
        r = await self.register(name, password)
        assert r.status_code == 201, r.text
        user_id = r.json()["id"]
        r = await self.login(name, password)
        assert r.status_code == 200, r.text
        body = r.json()
        user = User(name, user_id, body["access_token"], body["refresh_token"])
        self.users[name] = user
        return user

    async def transfer(
        self, user: User, to: str, amount: Any, key: str | None = None
    ) -> httpx.Response:
        headers = {**user.headers, "Idempotency-Key": key or f"t{next(_ids)}"}
        return await self.client.post(
            "/wallet/transfers", json={"to": to, "amount": amount}, headers=headers
        )

    async def balance(self, user: User) -> int:
        r = await self.client.get("/wallet", headers=user.headers)
        assert r.status_code == 200, r.text
        return int(r.json()["balance"])


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://arena", timeout=30.0
    )


async def migrate(runtime: Runtime) -> None:
    await runtime.db.open()
    try:
        await runtime.db.migrate()
    finally:
        await runtime.db.close()


@contextlib.asynccontextmanager
async def running_app(app: FastAPI, *, do_migrate: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Migrate the app's databases, run its lifespan, and yield an in-process client."""
    if do_migrate:
        await migrate(app.state.tenfold)
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


@contextlib.asynccontextmanager
async def running_arena(settings: Settings, *, do_migrate: bool = True) -> AsyncIterator[Arena]:
    """A started arena on `settings` (FAST overrides applied) and a client to it."""
    app = create_app(settings.model_copy(update=FAST))
    async with running_app(app, do_migrate=do_migrate) as client:
        yield Arena(app, app.state.tenfold, client)


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    """`r` is a problem+json of `status`; returns the body."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"] and body["detail"]
    return body
