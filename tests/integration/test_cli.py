"""The `tenfold` command, run as a user runs it: a subprocess, exit codes, stdout/stderr."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import services

CLI = [sys.executable, "-m", "tenfold.cli.main"]


def tenfold(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    full_env.update(env or {})
    full_env["COLUMNS"] = "200"
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=full_env, check=False
    )


def test_shards_on_embedded_default_covers_every_slot(tmp_path: Path) -> None:
    result = tenfold("shards", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["epoch"] == 1
    assert [s["shard"] for s in report["shards"]] == ["s0", "s1", "s2", "s3"]
    assert sum(s["slots"] for s in report["shards"]) == 4096
    assert all(s["reachable"] and s["rtt_ms"] is not None for s in report["shards"])
    assert (tmp_path / "data" / "catalog.db").exists()


def test_shards_table_is_human_readable() -> None:
    result = tenfold("shards")
    assert result.returncode == 0, result.stderr
    for text in ("shard", "slot ranges", "0-1023", "3072-4095", "reachable"):
        assert text in result.stdout


def test_check_fails_and_names_the_dead_shard(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    shards = [
        {"name": "good", "url": f"sqlite:///{tmp_path}/good.db"},
        {"name": "dead", "url": f"sqlite:///{blocker}/dead.db"},
    ]
    env = {"TENFOLD_SHARDS": json.dumps(shards), "TENFOLD_CONNECT_TIMEOUT_S": "1"}
    result = tenfold("shards", "check", "--json", env=env)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["unreachable"] == ["dead"]
    assert report["ok"] is False
    alone = {
        "TENFOLD_SHARDS": json.dumps(shards[:1]),
        "TENFOLD_CATALOG_URL": f"sqlite:///{tmp_path}/other-catalog.db",
    }
    ok = tenfold("shards", "check", env=alone)
    assert ok.returncode == 0, ok.stderr
    assert "all 1 shards reachable" in ok.stdout


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TENFOLD_SHARD_URL": "mysql://u:hunter2@h/app_{n}"}, "TENFOLD_SHARD_URL"),
        ({"TENFOLD_CATALOG_URL": "not a url"}, "TENFOLD_CATALOG_URL"),
        ({"TENFOLD_SHARD_COUNT": "abc"}, "TENFOLD_SHARD_COUNT"),
        ({"TENFOLD_SHARDS": "[{broken"}, "TENFOLD_"),
    ],
)
def test_bad_config_prints_one_line_not_a_traceback(env: dict[str, str], expected: str) -> None:
    result = tenfold("shards", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "hunter2" not in result.stderr


def test_missing_config_file_is_one_line() -> None:
    result = tenfold("--config", "nope.toml", "shards")
    assert result.returncode == 2
    assert "nope.toml" in result.stderr and "Traceback" not in result.stderr


def _write_migrations(root: Path) -> Path:
    (root / "shard").mkdir(parents=True)
    (root / "catalog").mkdir()
    (root / "shard" / "0001_notes.sql").write_text(
        "CREATE TABLE notes (slot INTEGER NOT NULL, id BIGINT PRIMARY KEY, body TEXT);\n"
        "CREATE INDEX notes_slot ON notes (slot, id);\n"
    )
    (root / "catalog" / "0001_accounts.sql").write_text(
        "CREATE TABLE accounts (id BIGINT PRIMARY KEY, name TEXT);\n"
    )
    return root


def test_db_migrate_then_status_on_sqlite(tmp_path: Path) -> None:
    folder = _write_migrations(tmp_path / "migrations")
    first = tenfold("db", "migrate", "--dir", str(folder), "--json")
    assert first.returncode == 0, first.stderr
    applied = json.loads(first.stdout)["applied"]
    assert applied["catalog"] == ["app/0001_accounts"]
    # tenfold's own shard schemas (outbox, refresh tokens) go first, then the app's.
    expected = [
        "tenfold.events/0001_outbox",
        "tenfold.auth/0001_refresh_tokens",
        "tenfold.reshard/0001_slot_state",
        "app/0001_notes",
    ]
    assert all(applied[s] == expected for s in ("s0", "s1", "s2", "s3"))
    again = json.loads(tenfold("db", "migrate", "--dir", str(folder), "--json").stdout)
    assert all(names == [] for names in again["applied"].values())
    status = tenfold("db", "status", "--dir", str(folder), "--json")
    assert status.returncode == 0, status.stderr
    for db in json.loads(status.stdout)["databases"]:
        assert db["pending"] == [] and db["changed"] == [] and db["convention"] == []


def test_db_status_flags_edited_migration_and_convention(tmp_path: Path) -> None:
    folder = _write_migrations(tmp_path / "migrations")
    assert tenfold("db", "migrate", "--dir", str(folder)).returncode == 0
    (folder / "shard" / "0001_notes.sql").write_text("CREATE TABLE notes (x INT);\n")
    (folder / "shard" / "0002_loose.sql").write_text("CREATE TABLE loose (id INT);\n")
    status = tenfold("db", "status", "--dir", str(folder), "--json")
    assert status.returncode == 1
    shard = next(d for d in json.loads(status.stdout)["databases"] if d["database"] == "s0")
    assert shard["changed"] == ["app/0001_notes"]
    assert shard["pending"] == ["app/0002_loose"]
    refused = tenfold("db", "migrate", "--dir", str(folder))
    assert refused.returncode == 2
    assert "0001_notes" in refused.stderr and "edited" in refused.stderr


@pytest.mark.postgres
def test_db_migrate_creates_postgres_databases(pg_admin_url: str, tmp_path: Path) -> None:
    prefix = services.unique_name("tfcli")
    names = [f"{prefix}_catalog", f"{prefix}_0", f"{prefix}_1"]
    base = pg_admin_url.rsplit("/", 1)[0]
    env = {
        "TENFOLD_CATALOG_URL": f"{base}/{prefix}_catalog",
        "TENFOLD_SHARD_URL": f"{base}/{prefix}_{{n}}",
        "TENFOLD_SHARD_COUNT": "2",
    }
    try:
        before = tenfold("shards", env=env)
        assert before.returncode == 2 and "does not exist" in before.stderr
        folder = _write_migrations(tmp_path / "migrations")
        result = tenfold("db", "migrate", "--dir", str(folder), "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["applied"]["s1"][-1] == "app/0001_notes"
        shards = tenfold("shards", "check", "--json", env=env)
        assert shards.returncode == 0, shards.stderr
        assert [s["slots"] for s in json.loads(shards.stdout)["shards"]] == [2048, 2048]
    finally:
        asyncio.run(services.drop_databases(pg_admin_url, names))
