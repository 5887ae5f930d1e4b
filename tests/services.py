"""Find or start the real servers the integration tests need.

PostgreSQL: use the one at `TENFOLD_TEST_PG_URL` (default 127.0.0.1:5432, user
postgres). When nothing answers there, start a throwaway cluster from the
system binaries (`initdb`, `pg_ctl`) on a free port, as the `postgres` user
when running as root, and stop it when the session ends. When neither works,
the tests that need it are skipped and the reason is printed once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tenfold.observe.services import (
    NatsServer,
    PostgresCluster,
    RedisServer,
    create_databases,
    database_url,
    drop_databases,
    free_port,
    pg_problem,
    redis_problem,
)

# How a server is started lives in tenfold.observe.services (shared with
# `tenfold up --stack local`); this module decides what the suite uses.
__all__ = [
    "NatsServer",
    "Service",
    "create_databases",
    "database_url",
    "drop_databases",
    "find_nats",
    "find_postgres",
    "find_redis",
]

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Service:
    name: str
    url: str | None = None
    how: str = ""
    problem: str | None = None
    _stop: list[list[str]] = field(default_factory=list)

    def stop(self) -> None:
        for cmd in self._stop:
            subprocess.run(cmd, capture_output=True, timeout=60, check=False)


def find_postgres() -> Service:
    url = os.environ.get("TENFOLD_TEST_PG_URL", DEFAULT_PG_URL)
    problem = asyncio.run(pg_problem(url))
    if problem is None:
        return Service("postgres", url, f"reachable at {url.split('@')[-1]}")
    started = _start_postgres()
    if started.url is None:
        started.problem = f"not reachable ({problem}) and could not start one: {started.problem}"
    return started


def _start_postgres() -> Service:
    root = Path(tempfile.mkdtemp(prefix="tenfold-pg-"))
    cluster = PostgresCluster(root, free_port(), durable=False)
    missing = cluster.missing()
    if missing:
        shutil.rmtree(root, ignore_errors=True)
        return Service("postgres", problem=missing)
    try:
        cluster.prepare()
        cluster.init()
        cluster.start()
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return Service("postgres", problem=f"{exc} {detail.decode(errors='replace')[:300]}")
    problem = asyncio.run(pg_problem(cluster.url))
    service = Service(
        "postgres",
        cluster.url if problem is None else None,
        f"started from {cluster.initdb} on port {cluster.port}",
        problem,
    )
    service._stop.append(cluster.stop_command())
    service._stop.append(["rm", "-rf", str(root)])
    return service


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def find_nats() -> tuple[Service, NatsServer | None]:
    """Start a pinned NATS for the session; fall back to TENFOLD_TEST_NATS_URL or :4222."""
    server = NatsServer()
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.stop()
        url = os.environ.get("TENFOLD_TEST_NATS_URL", "nats://127.0.0.1:4222")
        with socket.socket() as s:
            host, port = url.split("//", 1)[1].rsplit(":", 1)
            if s.connect_ex((host, int(port))) == 0:
                return Service(
                    "nats", url, f"reachable at {url} (could not start one: {exc})"
                ), None
        return Service("nats", problem=f"could not start one ({exc}) and none at {url}"), None
    service = Service("nats", server.url, f"started {server.binary} on port {server.port}")
    return service, server


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def find_redis() -> Service:
    """Redis at `TENFOLD_TEST_REDIS_URL` (default 127.0.0.1:6379), else a throwaway redis-server."""
    url = os.environ.get("TENFOLD_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    problem = redis_problem(url)
    if problem is None:
        return Service("redis", url, f"reachable at {url.split('@')[-1]}")
    server = RedisServer()
    if server.binary is None:
        return Service("redis", problem=f"not reachable at {url} ({problem}) and no redis-server")
    proc = server.start()
    service = Service("redis", how=f"started {server.binary} on port {server.port}")
    service._stop.append(["kill", str(proc.pid)])
    waited = server.wait_ready(10)
    if waited is None:
        service.url = server.url
    elif proc.poll() is not None:
        service.problem = f"not reachable at {url} and redis-server exited ({proc.returncode})"
    else:
        service.problem = f"not reachable at {url} and redis-server did not answer within 10 s"
    return service
