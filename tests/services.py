"""Find or start the real servers the integration tests need.

PostgreSQL: use the one at `TENFOLD_TEST_PG_URL` (default 127.0.0.1:5432, user
postgres). When nothing answers there, start a throwaway cluster from the
system binaries (`initdb`, `pg_ctl`) on a free port, as the `postgres` user
when running as root, and stop it when the session ends. When neither works,
the tests that need it are skipped and the reason is printed once.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _pg_ok(url: str) -> str | None:
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed (pip install 'tenfold[postgres]')"
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def find_postgres() -> Service:
    url = os.environ.get("TENFOLD_TEST_PG_URL", DEFAULT_PG_URL)
    problem = asyncio.run(_pg_ok(url))
    if problem is None:
        return Service("postgres", url, f"reachable at {url.split('@')[-1]}")
    started = _start_postgres()
    if started.url is None:
        started.problem = f"not reachable ({problem}) and could not start one: {started.problem}"
    return started


def _start_postgres() -> Service:
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        return Service("postgres", problem="initdb/pg_ctl not found on PATH or /usr/lib/postgresql")
    root = Path(tempfile.mkdtemp(prefix="tenfold-pg-"))
    data, port = root / "data", _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    try:
        subprocess.run(
            [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
            check=True, capture_output=True, timeout=120,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return Service("postgres", problem=f"{exc} {detail.decode(errors='replace')[:300]}")
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    problem = asyncio.run(_pg_ok(url))
    service = Service(
        "postgres", url if problem is None else None, f"started from {initdb} on port {port}",
        problem,
    )
    service._stop.append([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
    service._stop.append(["rm", "-rf", str(root)])
    return service


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def create_databases(admin_url: str, names: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        for name in names:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_databases(admin_url: str, names: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def database_url(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
