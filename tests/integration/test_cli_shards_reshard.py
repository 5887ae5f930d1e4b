"""`tenfold shards add | plan | move | moves | complete | reverse`, run as a user runs them:
a subprocess per command, exit codes, stdout and stderr, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenfold.config import Settings
from tenfold.data import ShardedDatabase
from tenfold.keyspace import slot_of
from tests import services
from tests.integration.support import seed_arena_users

ARENA = Path(__file__).resolve().parents[2] / "apps" / "arena" / "migrations"
CLI = [sys.executable, "-m", "tenfold.cli.main"]


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    env.update(
        {
            "TENFOLD_SHARDS": json.dumps([{"name": s.name, "url": s.url} for s in settings.shards]),
            "TENFOLD_CATALOG_URL": settings.catalog_url,
            "TENFOLD_MIGRATIONS_DIR": str(ARENA),
            "TENFOLD_TOPOLOGY_TTL_S": "0.2",
            "TENFOLD_CONNECT_TIMEOUT_S": "5",
            "COLUMNS": "200",
        }
    )
    return env


class Cli:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], capture_output=True, text=True, timeout=90, env=self.env, check=False
        )

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args: str) -> str:
        """Run a command that must fail: exit 1, one error line, no traceback."""
        result = self(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
        assert result.stderr.startswith("error: "), result.stderr
        return " ".join(result.stderr.split())  # undo Rich's wrapping

    def state(self) -> tuple[int, list[dict[str, Any]]]:
        """The topology epoch and the move records: what a refused command must not change."""
        return self.json("shards")["epoch"], self.json("shards", "moves")["moves"]


async def _seed(settings: Settings, n: int) -> dict[str, int]:
    """`n` arena users with wallets: name -> balance."""
    async with ShardedDatabase(settings) as db:
        return await seed_arena_users(db, n, password_hash="x" * 20)


async def _wallets(settings: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """Each user's balance read from the slot's owner, and rows per shard of slots < 256."""
    async with ShardedDatabase(settings) as db:
        await db.refresh_topology()
        balances: dict[str, int] = {}
        low: dict[str, int] = {}
        for name in db.topology.shards:
            async with db.shard(name) as conn:
                rows = await conn.fetch(
                    "SELECT u.username, u.slot, w.balance FROM arena_users u "
                    "JOIN arena_wallets w ON w.user_id = u.id"
                )
            for r in rows:
                if db.topology.shard_of_slot(r["slot"]) == name:
                    assert r["username"] not in balances, f"{r['username']} on two owners"
                    balances[r["username"]] = int(r["balance"])
                if r["slot"] < 256:
                    low[name] = low.get(name, 0) + 1
        return balances, low


@pytest.fixture
def new_shard_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL for a shard database that does not exist yet (`shards add` creates it)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/added/shard_new.db"
        return
    admin = request.getfixturevalue("pg_admin_url")
    name = services.unique_name("tft_added")
    yield services.database_url(admin, name)
    asyncio.run(services.drop_databases(admin, [name]))


@pytest.mark.timeout(300)  # ~30 CLI processes; the box is shared
def test_add_plan_move_complete_reverse_and_refusals(
    make_settings: Any, new_shard_url: str
) -> None:
    settings = make_settings(shards=2, migrations_dir=str(ARENA))
    cli = Cli(_env(settings))
    cli.ok("db", "migrate")
    seeded = asyncio.run(_seed(settings, 400))

    # add: an empty shard listed in a new epoch.
    added = cli.json("shards", "add", "s2", new_shard_url)
    assert added["shards"] == ["s0", "s1", "s2"] and added["slots"] == 0
    epoch = added["epoch"]
    assert epoch == 2
    assert cli.json("shards")["shards"][2]["slots"] == 0

    # plan: moves to the new shard, rows and bytes each, a measured speed; changes nothing.
    plan = cli.json("shards", "plan")
    assert plan["balanced"] == "rows"
    assert plan["moves"] and {m["target"] for m in plan["moves"]} == {"s2"}
    assert sum(m["rows"] for m in plan["moves"]) > 0
    assert all(m["bytes"] > 0 and m["copy_s"] is not None for m in plan["moves"])
    assert plan["copy_speed"].startswith("measured by timing a read of")
    total_rows = sum(v["before"] for v in plan["shards"].values())
    assert total_rows == 2 * len(seeded)  # a user row and a wallet row each
    third = total_rows / 3
    assert all(abs(v["after"] - third) < 0.1 * third for v in plan["shards"].values())
    text = cli.ok("shards", "plan", "--even")
    assert "s0->s2" in text and "s1->s2" in text and "measured by" in text
    assert "needs 5 shards but only 3 are registered" in cli.refused("shards", "plan", "--to", "5")
    assert cli.state() == (epoch, [])

    # Bad moves: each one clear line naming the problem, nothing changed.
    refusals = {
        ("0-10,5-20", "s2"): "slot ranges 0-10 and 5-20 overlap",
        ("4096", "s2"): "slot range 4096 is outside 0-4095",
        ("0-3", "s9"): "no shard named 's9'",
        ("0-3", "s0"): "shard s0 already owns slot(s) 0-3",
        ("10-5", "s2"): "reversed",
    }
    for (slots, to), message in refusals.items():
        assert message in cli.refused("shards", "move", slots, "--to", to), (slots, to)
    assert "no move 'mv-nope'" in cli.refused("shards", "resume", "mv-nope")
    assert cli.state() == (epoch, [])

    # move 0-255 to the new shard: switched, one epoch on.
    [first] = cli.json("shards", "move", "0-255", "--to", "s2")["moves"]
    assert (first["source"], first["target"], first["state"]) == ("s0", "s2", "switched")
    assert first["progress"]["copied_rows"] == first["progress"]["total_rows"] > 0
    epoch, listed = cli.state()
    assert epoch == 3
    assert [(m["id"], m["state"]) for m in listed] == [(first["id"], "switched")]
    table = cli.ok("shards", "moves")
    assert first["id"] in table and "s0->s2" in table and "switched" in table

    # A second move of held slots is refused by name, and changes nothing.
    held = cli.refused("shards", "move", "100-300", "--to", "s1")
    assert "already being moved" in held and first["id"] in held
    assert "switched: after the switch use `reverse`" in cli.refused(
        "shards", "cancel", first["id"]
    )
    assert cli.state() == (epoch, listed)

    # Another move, then reverse it: s1 owns its slots again, with every row.
    [second] = cli.json("shards", "move", "2048-2303", "--to", "s2", "--duty", "1")["moves"]
    assert (second["source"], second["state"]) == ("s1", "switched")
    back = cli.json("shards", "reverse", second["id"])["moves"][0]
    assert back["state"] == "reversed"
    topo = cli.json("shards")
    owners = {s["shard"]: s["slot_ranges"] for s in topo["shards"]}
    assert "0-255" in owners["s2"] and "2048-2303" not in ",".join(owners["s2"])

    # complete the first: the source keeps nothing of slots 0-255.
    done = cli.json("shards", "complete", first["id"])["moves"][0]
    assert done["state"] == "completed"
    assert done["progress"]["deleted_rows"] == first["progress"]["total_rows"]
    balances, low = asyncio.run(_wallets(settings))
    assert balances == seeded
    moved = sum(1 for n in seeded if slot_of(n) < 256)
    assert low == {"s2": moved}
    states = {m["id"]: m["state"] for m in cli.json("shards", "moves")["moves"]}
    assert states == {first["id"]: "completed", second["id"]: "reversed"}
    # A finished move asked to change course is refused by name, not a silent no-op.
    epoch = cli.json("shards")["epoch"]
    refused = cli.refused("shards", "reverse", first["id"])
    assert "already completed" in refused and "shards move 0-255 --to s0" in refused
    assert "already reversed" in cli.refused("shards", "cancel", second["id"])
    assert cli.json("shards")["epoch"] == epoch
    # The plan now measures speed by the completed move.
    assert cli.json("shards", "plan")["copy_speed"].startswith(f"measured by move {first['id']}")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_rebalance_runs_the_plan_then_plans_nothing(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(shards=2, migrations_dir=str(ARENA))
    cli = Cli(_env(settings))
    cli.ok("db", "migrate")
    seeded = asyncio.run(_seed(settings, 300))
    before = cli.state()
    assert "needs 4 shards" in cli.refused("shards", "rebalance", "--to", "4")
    assert cli.state() == before
    cli.json("shards", "add", "s2", f"sqlite:///{tmp_path}/added/s2.db")
    out = cli.json("shards", "rebalance", "--even", "--complete", "--duty", "1")
    moves = out["moves"]
    assert {(m["source"], m["target"], m["state"]) for m in moves} == {
        ("s0", "s2", "completed"),
        ("s1", "s2", "completed"),
    }
    assert [m["slots"] for m in moves] == [m["slots"] for m in out["plan"]["moves"]]
    counts = {s["shard"]: s["slots"] for s in cli.json("shards")["shards"]}
    assert sorted(counts.values()) == [1365, 1365, 1366]
    assert cli.json("shards", "plan", "--even")["moves"] == []
    assert "nothing to move" in cli.ok("shards", "rebalance", "--even")
    balances, _ = asyncio.run(_wallets(settings))
    assert balances == seeded


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_move_between_shards_of_different_schemas_is_refused_before_it_starts(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings(shards=2, migrations_dir=str(ARENA))
    cli = Cli(_env(settings))
    cli.ok("db", "migrate")
    cli.json("shards", "add", "s2", f"sqlite:///{tmp_path}/added/s2.db")

    async def drift() -> None:  # a slot table only the source has: the copy cannot start
        async with ShardedDatabase(settings) as db, db.shard("s0") as conn:
            await conn.execute("CREATE TABLE drift (slot INTEGER NOT NULL, id INTEGER PRIMARY KEY)")

    asyncio.run(drift())
    epoch = cli.json("shards")["epoch"]
    # Refused before anything is recorded: no move row, no claim, no new epoch.
    message = cli.refused("shards", "move", "0-10", "--to", "s2")
    assert "table drift differs between s0 and s2" in message
    assert cli.json("shards", "moves")["moves"] == []
    assert cli.json("shards")["epoch"] == epoch
