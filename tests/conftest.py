"""Shared fixtures: backends (SQLite everywhere, PostgreSQL for real), throwaway databases.

`backend` parametrises a test over "sqlite" and "postgres"; `make_settings`
gives settings for N shards (and replicas) on that backend, creating fresh
databases (Postgres) or files (SQLite) and dropping them after the test;
`make_db` opens a `ShardedDatabase` on such settings.

Markers: a test that needs a server carries its marker (`postgres`, `redis`,
`nats`), so `-m "not redis"` runs without one. `backend`'s postgres param is
marked where it is declared; `redis` and `nats` are added at collection to
every test that uses `redis_url`, `nats_url` or `nats_server`, or is
parametrised with the value "redis" / "nats" (fixtures that call
`getfixturevalue` for their server). Servers are found or started once, on
first use; one `services:` line at the end says which were used, started or
skipped and why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tenfold import ShardedDatabase
from tenfold.config import Settings, ShardSpec
from tests import services

_SERVICES: dict[str, services.Service] = {}


def _run(coro: Awaitable[Any]) -> Any:
    """Run a coroutine to completion from sync code, even inside a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


def _postgres() -> services.Service:
    if "postgres" not in _SERVICES:
        _SERVICES["postgres"] = services.find_postgres()
    return _SERVICES["postgres"]


def _nats() -> services.Service:
    if "nats" not in _SERVICES:
        _SERVICES["nats"], _NATS["server"] = services.find_nats()
    return _SERVICES["nats"]


_NATS: dict[str, services.NatsServer | None] = {}


def _redis() -> services.Service:
    if "redis" not in _SERVICES:
        _SERVICES["redis"] = services.find_redis()
    return _SERVICES["redis"]


_SERVER_FIXTURES = {
    "redis": ("redis_url",),
    "nats": ("nats_url", "nats_server"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs Redis or NATS (see the module docstring)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params = set(map(str, callspec.params.values())) if callspec is not None else set()
        for marker, fixtures in _SERVER_FIXTURES.items():
            if names.intersection(fixtures) or marker in params:
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a reachable Redis (started from `redis-server` on PATH if needed)."""
    svc = _redis()
    if svc.url is None:
        pytest.skip(f"redis unavailable: {svc.problem}")
    return svc.url


@pytest.fixture(scope="session")
def nats_url() -> str:
    """URL of a session NATS with JetStream (the pinned wheel's server, sync_interval always)."""
    svc = _nats()
    if svc.url is None:
        pytest.skip(f"nats unavailable: {svc.problem}")
    return svc.url


@pytest.fixture
def nats_server() -> Iterator[services.NatsServer]:
    """A private NATS server for tests that kill and restart it."""
    server = services.NatsServer()
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.stop()
        pytest.skip(f"cannot start nats-server: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """Admin URL of a reachable PostgreSQL (started by the harness if needed)."""
    svc = _postgres()
    if svc.url is None:
        pytest.skip(f"postgres unavailable: {svc.problem}")
    return svc.url


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for svc in _SERVICES.values():
        svc.stop()
    server = _NATS.get("server")
    if server is not None:
        server.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _SERVICES:
        return
    parts = []
    for svc in _SERVICES.values():
        parts.append(
            f"{svc.name}: {svc.how}" if svc.url else f"{svc.name}: SKIPPED ({svc.problem})"
        )
    terminalreporter.write_line("services: " + "; ".join(parts))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


MakeSettings = Callable[..., Settings]


@pytest.fixture
def make_settings(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MakeSettings]:
    """`make_settings(shards=4, replicas=0, **overrides)` on the test's backend."""
    created: list[str] = []
    admin = request.getfixturevalue("pg_admin_url") if backend == "postgres" else ""

    def make(shards: int = 4, replicas: int = 0, **overrides: Any) -> Settings:
        if backend == "sqlite":
            base = tmp_path / f"db{len(created)}"
            created.append(str(base))
            specs = [
                ShardSpec(
                    name=f"s{n}",
                    url=f"sqlite:///{base}/shard{n}.db",
                    replicas=[f"sqlite:///{base}/shard{n}_r{r}.db" for r in range(replicas)],
                )
                for n in range(shards)
            ]
            catalog = f"sqlite:///{base}/catalog.db"
        else:
            prefix = services.unique_name("tft")
            names = [f"{prefix}_cat"] + [f"{prefix}_{n}" for n in range(shards)]
            names += [f"{prefix}_{n}_r{r}" for n in range(shards) for r in range(replicas)]
            _run(services.create_databases(admin, names))
            created.extend(names)
            specs = [
                ShardSpec(
                    name=f"s{n}",
                    url=services.database_url(admin, f"{prefix}_{n}"),
                    replicas=[
                        services.database_url(admin, f"{prefix}_{n}_r{r}") for r in range(replicas)
                    ],
                )
                for n in range(shards)
            ]
            catalog = services.database_url(admin, f"{prefix}_cat")
        values: dict[str, Any] = {
            "catalog_url": catalog,
            "shards": specs,
            "connect_timeout_s": 2.0,
            "pool_max_size": 8,
        }
        values.update(overrides)
        return Settings(**values)

    yield make
    if backend == "postgres" and created:
        _run(services.drop_databases(admin, created))


@pytest.fixture
async def make_db(
    make_settings: MakeSettings,
) -> AsyncIterator[Callable[..., Awaitable[ShardedDatabase]]]:
    """`await make_db(shards=4, replicas=0, migrate=True, **overrides)` → an open database."""
    opened: list[ShardedDatabase] = []

    async def make(
        shards: int = 4, replicas: int = 0, migrate: bool = True, **overrides: Any
    ) -> ShardedDatabase:
        db = ShardedDatabase(make_settings(shards, replicas, **overrides))
        await db.open()
        opened.append(db)
        if migrate:
            await db.migrate()
        return db

    yield make
    for db in opened:
        await db.close()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's TENFOLD_* variables or a tenfold.toml in the cwd."""
    for name in list(os.environ):
        if name.startswith("TENFOLD_") and not name.startswith("TENFOLD_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
