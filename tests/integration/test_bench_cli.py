"""`tenfold bench` against a real `tenfold up` (embedded mode, cheap password hashing)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.support import free_port

# find_spec, not importorskip: importing locust here would monkey-patch this process (gevent)
if importlib.util.find_spec("locust") is None or importlib.util.find_spec("matplotlib") is None:
    pytest.skip("locust or matplotlib not installed (the bench extra)", allow_module_level=True)

CLI = [sys.executable, "-m", "tenfold.cli.main"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    env.update({"TENFOLD_PASSWORD_PROFILE": "testing", "TENFOLD_LOG_LEVEL": "WARNING"})
    env["COLUMNS"] = "200"
    return env


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [*CLI, "up", "--port", str(port)], cwd=tmp_path, env=_env(), stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "tenfold up did not listen within 20 s"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "bench", *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bench_reports_every_task_kind(arena: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = bench(
        tmp_path, "--host", arena, "--users", "5", "--time", "5s", "--out", str(out), "--json"
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary
    assert summary["requests"] > 0
    assert summary["failures"] <= summary["requests"] * 0.02, summary["routes"]
    for kind in ("login", "chat", "wallet"):
        assert summary["tasks"][kind]["requests"] > 0, kind
    names = {r["name"] for r in summary["routes"]}
    assert {"/auth/login", "/rooms/{id}/messages", "/wallet/transfers"} <= names
    overall = summary["overall"]
    assert 0 < overall["p50_ms"] <= overall["p95_ms"] <= overall["p99_ms"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2


def test_bench_without_an_app_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = bench(tmp_path, "--host", f"http://127.0.0.1:{free_port()}", "--time", "1s")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no app answers" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_rejects_a_bad_duration(tmp_path: Path) -> None:
    result = bench(tmp_path, "--time", "soon")
    assert result.returncode == 2
    assert "--time" in result.stderr
