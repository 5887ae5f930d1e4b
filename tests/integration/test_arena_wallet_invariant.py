"""The wallet's invariant under concurrent random transfers and a consumer outage.

N users with 1000 points each send random transfers at each other (some to
users who do not exist) concurrently; mid-run the first app process is stopped
(its consumers and relays end) and a second one is started on the same
databases. After quiescence: the sum of all balances is unchanged, every
completed transfer has exactly one credit row, no refunded transfer has one,
and each balance is 1000 - sent (completed) + received.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apps.arena.app import create_app
from tenfold.config import Settings
from tests.integration.arena_support import (
    FAST,
    Arena,
    User,
    client_for,
    migrate,
    sqlite_settings,
)
from tests.integration.support import wait_until

START = 1000


async def _scenario(
    settings: Settings,
    users: int,
    transfers: int,
    seed: int,
    restart: bool = True,
    settle_s: float = 60,
) -> None:
    rng = random.Random(seed)
    settings = settings.model_copy(update=FAST)
    first = create_app(settings)
    await migrate(first.state.tenfold)
    results: list[tuple[User, dict[str, Any]]] = []

    async with first.router.lifespan_context(first), client_for(first) as client:
        arena = Arena(first, first.state.tenfold, client)
        people = [await arena.signup(f"user_{n:02d}") for n in range(users)]
        names = [p.name for p in people]

        gate = asyncio.Semaphore(12)  # concurrent; sheds (503) are refusals, not transfers

        async def send(i: int) -> None:
            async with gate:
                await _send(i)

        async def _send(i: int) -> None:
            sender = rng.choice(people)
            to = rng.choice([n for n in names if n != sender.name] + ["ghost_1", "ghost_2"])
            r = await arena.transfer(sender, to, rng.randint(1, 150), key=f"inv-{i}")
            # 409: not covered; 503: shed by admission control (nothing was run)
            assert r.status_code in (202, 409, 503), r.text
            if r.status_code == 202:
                results.append((sender, r.json()))

        half = transfers // 2 if restart else transfers
        await asyncio.gather(*(send(i) for i in range(half)))
        if not restart:
            await _check(arena, people, names, results, users, settle_s)
            return

    # the first process is gone (consumers stopped mid-saga); a second takes over
    second = create_app(settings)
    async with second.router.lifespan_context(second), client_for(second) as client:
        arena = Arena(second, second.state.tenfold, client)
        await asyncio.gather(*(send(i) for i in range(half, transfers)))
        await _check(arena, people, names, results, users, settle_s)


async def _check(
    arena: Arena,
    people: list[User],
    names: list[str],
    results: list[tuple[User, dict[str, Any]]],
    users: int,
    settle_s: float,
) -> None:
    client = arena.client
    if True:
        assert len(results) > len(people)

        async def settled() -> bool:
            for sender, t in results:
                r = await client.get(f"/wallet/transfers/{t['id']}", headers=sender.headers)
                t["status"] = r.json()["status"]
            return all(t["status"] in ("completed", "refunded") for _, t in results)

        await wait_until(settled, timeout_s=settle_s, what="every transfer settled")
        balances = {p.name: await arena.balance(p) for p in people}
        rt = arena.runtime
        credits: dict[int, int] = {}
        for shard in rt.db.shard_names:
            async with rt.db.shard(shard) as conn:
                for row in await conn.fetch("SELECT transfer_id FROM arena_credits"):
                    credits[int(row["transfer_id"])] = credits.get(int(row["transfer_id"]), 0) + 1

    assert sum(balances.values()) == users * START
    expected = dict.fromkeys(names, START)
    for sender, t in results:
        tid = int(t["id"])
        if t["status"] == "completed":
            assert credits.get(tid) == 1, (tid, credits.get(tid))
            assert t["to"] in expected
            expected[sender.name] -= t["amount"]
            expected[t["to"]] += t["amount"]
        else:
            assert tid not in credits
    assert set(credits) == {int(t["id"]) for _, t in results if t["status"] == "completed"}
    assert all(n == 1 for n in credits.values())
    assert balances == expected
    assert any(t["status"] == "refunded" for _, t in results)
    assert any(t["status"] == "completed" for _, t in results)


async def test_wallet_invariant_sqlite(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path / "inv", shards=3)
    await _scenario(settings, users=20, transfers=300, seed=7, restart=False)


async def test_wallet_invariant_sqlite_process_restart(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path / "inv", shards=3)
    await _scenario(settings, users=20, transfers=120, seed=7, restart=True, settle_s=4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_wallet_invariant_postgres_nats(
    make_settings: Callable[..., Settings], nats_url: str
) -> None:
    settings = make_settings(shards=4, events_url=nats_url)
    await _scenario(settings, users=20, transfers=1000, seed=11)
