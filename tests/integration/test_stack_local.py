"""`tenfold up --stack local`, run as a user runs it: a subprocess in an empty directory.

It finds or starts PostgreSQL, NATS and Redis, migrates, serves the arena app;
SIGTERM drains, exits 0 and leaves none of the servers it started running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tenfold.cli.stack import LocalStack, StackError
from tenfold.observe import services
from tenfold.observe.services import free_port, pg_binary

CLI = [sys.executable, "-m", "tenfold.cli.main"]


def _processes_mentioning(*needles: str) -> list[str]:
    """Command lines of live processes (other than this one) that mention any of `needles`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if cmdline and any(n in cmdline for n in needles):
            found.append(f"{entry.name}: {cmdline}")
    return found


class Up:
    """`tenfold up --stack local` in `cwd`, output in `logs`."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path, *args: str) -> None:
        logs.mkdir()
        self.logs = logs
        self.base = f"http://127.0.0.1:{free_port()}"
        self._out, self._err = (logs / "out.log").open("wb"), (logs / "err.log").open("wb")
        self.proc = subprocess.Popen(
            [*CLI, "up", "--stack", "local", "--port", self.base.rsplit(":", 1)[1], *args],
            cwd=cwd,
            env=env,
            stdout=self._out,
            stderr=self._err,
            start_new_session=True,  # `close` can end the workers too, not only the parent
        )

    def output(self) -> str:
        return (self.logs / "out.log").read_text() + (self.logs / "err.log").read_text()[-3000:]

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"tenfold up exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready within {timeout_s} s:\n{self.output()}")
            time.sleep(0.1)

    def sigterm(self, timeout_s: float = 20.0) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the exit took."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        return code, time.monotonic() - started

    def close(self) -> None:
        # The whole group: a killed parent leaves uvicorn's workers (and their
        # PostgreSQL connections) behind otherwise.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._out.close()
        self._err.close()


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A TMPDIR the postgres user can enter, removed after the test.

    As root, pytest's 0700 tmp dirs are closed to the postgres user: a stack
    that starts PostgreSQL then keeps the cluster under TMPDIR.
    """
    tmp = Path(tempfile.mkdtemp(prefix="tenfold-stack-test-"))
    tmp.chmod(0o755)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    env.update(PYTHONUNBUFFERED="1", TENFOLD_LOG_LEVEL="WARNING", **extra)
    return env


def _exercise(base: str) -> None:
    """/readyz lists every shard and the broker as ok; a user registers (201)."""
    ready = httpx.get(f"{base}/readyz", timeout=5).json()
    assert ready["ready"] is True
    checks = ready["checks"]
    shards = [k for k in checks if k.startswith("shard:")]
    assert len(shards) == 4 and all(checks[k]["ok"] for k in shards), checks
    assert checks["events"]["ok"] is True, checks
    assert checks.get("cache", {"ok": True})["ok"] is True, checks
    name = f"u{uuid.uuid4().hex[:12]}"
    reply = httpx.post(
        f"{base}/auth/register",
        json={"username": name, "password": "correct horse battery staple"},
        timeout=10,
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["username"] == name


def test_up_stack_local_serves_and_stops_what_it_started(tmp_path: Path, open_tmp: Path) -> None:
    """Reuses servers already answering on the standard ports; always starts its own NATS."""
    needles = (str(tmp_path / "data" / "stack"), str(open_tmp))
    up = Up(tmp_path, _env(TMPDIR=str(open_tmp)), tmp_path / "logs")
    try:
        up.wait_ready()
        try:
            _exercise(up.base)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{up.output()}") from None
        assert any("nats-server" in p for p in _processes_mentioning(*needles))
        code, took = up.sigterm()
    finally:
        up.close()
    assert code == 0, up.output()
    assert took < 20
    out = up.output()
    assert "nats" in out and "started" in out and "tenfold_catalog" in out
    assert not _processes_mentioning(*needles)


@pytest.mark.skipif(
    not (pg_binary("initdb") and pg_binary("pg_ctl")), reason="initdb/pg_ctl not installed"
)
def test_up_stack_local_starts_every_server_itself(tmp_path: Path, open_tmp: Path) -> None:
    """TENFOLD_STACK_REUSE=0: PostgreSQL, NATS and Redis all started, all stopped on SIGTERM."""
    needles = (str(tmp_path / "data" / "stack"), str(open_tmp))
    env = _env(TENFOLD_STACK_REUSE="0", TMPDIR=str(open_tmp))
    up = Up(tmp_path, env, tmp_path / "logs")
    try:
        up.wait_ready()
        try:
            _exercise(up.base)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{up.output()}") from None
        running = _processes_mentioning(*needles)
        assert any("nats-server" in p for p in running), running
        assert any("postgres" in p for p in running), running
        code, took = up.sigterm()
    finally:
        up.close()
    out = up.output()
    assert code == 0, out
    assert took < 20
    assert out.count("started") >= 3, out
    assert not _processes_mentioning(*needles)
    # redis-server's command line names only its port: check that port is closed now.
    ports = [
        line.split("redis://127.0.0.1:")[1].split("/")[0]
        for line in out.splitlines()
        if "redis://127.0.0.1:" in line and ":6379/" not in line
    ]
    assert ports, out
    assert not services.port_open("127.0.0.1", int(ports[0]))


def test_missing_postgres_binaries_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services, "pg_binary", lambda name: None)
    stack = LocalStack(tmp_path / "stack", reuse=False)
    with pytest.raises(StackError) as caught:
        stack.postgres(1.0)
    message = str(caught.value)
    assert "\n" not in message
    assert "postgres" in message and "apt-get install postgresql" in message
    stack.stop()
