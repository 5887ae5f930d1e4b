"""kill -9 of `tenfold up` (embedded: SQLite shards, memory:// events) mid-transfers.

The user's default deployment, run as a user runs it: `tenfold up` in an empty
directory. Concurrent wallet transfers (some to users who do not exist, so
the saga's refund path runs too) are in flight when the server is SIGKILLed,
twice; each time it is started again on the same ./data. Clients whose
request died with the process retry with the same Idempotency-Key, as a
client must. After settling: no transfer is left pending, the sum of all
balances is unchanged, every balance is 1000 - sent + received, and no outbox
row is left unpublished.

Before the relay waited for consumers to settle each event, such a kill left
transfers pending forever (debited and never credited or refunded).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.support import free_port, wait_until

CLI = [sys.executable, "-m", "tenfold.cli.main"]
START = 1000
PASSWORD = "correct horse battery staple"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    env.update({"TENFOLD_PASSWORD_PROFILE": "testing", "TENFOLD_LOG_LEVEL": "WARNING"})
    # The restarted server waits out the dead one's relay leases: 3 s, not the default 10.
    env["TENFOLD_RELAY_LEASE_S"] = "3"
    return env


@dataclass
class Server:
    cwd: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = (self.cwd / f"up.{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [*CLI, "up", "--port", str(self.port)],
            cwd=self.cwd,
            env=_env(),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert time.monotonic() < deadline, "tenfold up did not listen within 30 s"
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return (self.cwd / f"up.{self.starts}.log").read_text(errors="replace")[-3000:]


@dataclass
class Person:
    name: str
    headers: dict[str, str]


@dataclass
class Sent:
    sender: Person
    to: str
    amount: int
    key: str
    id: str | None = None
    status: str = "unknown"


async def _signup(client: httpx.AsyncClient, name: str) -> Person:
    r = await client.post("/auth/register", json={"username": name, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await client.post("/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return Person(name, {"Authorization": f"Bearer {r.json()['access_token']}"})


async def _send(client: httpx.AsyncClient, t: Sent) -> None:
    """POST the transfer; a dead server leaves `t.id` unknown, for a retry with the same key."""
    headers = {**t.sender.headers, "Idempotency-Key": t.key}
    try:
        r = await client.post(
            "/wallet/transfers", json={"to": t.to, "amount": t.amount}, headers=headers
        )
    except httpx.TransportError:
        return  # the server died under it: committed or not, the retry will tell
    if r.status_code == 202:
        t.id = r.json()["id"]
    elif r.status_code in (409, 429, 503):  # not covered / limited / shed: nothing was done
        t.status = "refused"
    else:
        raise AssertionError(f"transfer answered {r.status_code}: {r.text}")


def _tally(batch: list[Sent]) -> str:
    accepted = sum(t.id is not None for t in batch)
    refused = sum(t.status == "refused" for t in batch)
    return f"{accepted} accepted, {refused} refused, {len(batch) - accepted - refused} unanswered"


def _pending_outbox(data: Path) -> int:
    total = 0
    for path in sorted(data.glob("shard*.db")):
        with sqlite3.connect(path) as conn:
            total += conn.execute(
                "SELECT COUNT(*) FROM tenfold_outbox WHERE published_at IS NULL"
            ).fetchone()[0]
    return total


@pytest.mark.timeout(240)
async def test_kill9_of_tenfold_up_mid_transfers_leaves_nothing_pending(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("TENFOLD_TEST_CHAOS_SEED") or 13))
    server = Server(tmp_path, free_port())
    server.start()
    sent: list[Sent] = []
    try:
        async with httpx.AsyncClient(base_url=server.base, timeout=10.0) as client:
            people = [await _signup(client, f"kill_{n:02d}") for n in range(12)]
            names = [p.name for p in people]

            def new_transfer(i: int) -> Sent:
                sender = rng.choice(people)
                to = rng.choice([n for n in names if n != sender.name] + ["ghost_a", "ghost_b"])
                return Sent(sender, to, rng.randint(1, 60), f"kill-{i}")

            for round_ in range(2):
                batch = [new_transfer(len(sent) + i) for i in range(400)]
                sent += batch
                gate = asyncio.Semaphore(64)

                async def go(t: Sent, gate: asyncio.Semaphore = gate) -> None:
                    async with gate:
                        await _send(client, t)

                tasks = [asyncio.create_task(go(t)) for t in batch]
                # Kill once transfers are flowing: sagas are mid-way in the stream.
                # Or every one answered: a round whose senders ran dry answers with
                # more refusals (409), and the sagas are still mid-way then.
                try:
                    await wait_until(
                        lambda batch=batch, tasks=tasks: (
                            sum(t.id is not None for t in batch) >= 150
                            or all(task.done() for task in tasks)
                        ),
                        timeout_s=60,
                        what=f"round {round_}: 150 transfers accepted",
                    )
                except AssertionError as exc:
                    raise AssertionError(f"{exc} ({_tally(batch)})") from None
                server.kill9()
                await asyncio.gather(*tasks)
                server.start()
                # Retry with the same key whatever the dead server did not answer.
                for t in batch:
                    if t.id is None and t.status != "refused":
                        await _send(client, t)
                        assert t.id is not None or t.status == "refused", t

            # The headers carry tokens signed by the first server: the key is kept in ./data.
            accepted = [t for t in sent if t.id is not None]
            assert len(accepted) > 100

            async def settled() -> bool:
                for t in accepted:
                    if t.status in ("completed", "refunded"):
                        continue
                    r = await client.get(f"/wallet/transfers/{t.id}", headers=t.sender.headers)
                    assert r.status_code == 200, r.text
                    t.status = r.json()["status"]
                return all(t.status in ("completed", "refunded") for t in accepted)

            try:
                await wait_until(settled, timeout_s=60, what="every transfer settled")
            except AssertionError:
                stuck = [(t.id, t.status) for t in accepted if t.status == "pending"]
                raise AssertionError(f"{len(stuck)} transfers pending: {stuck[:10]}") from None

            balances: dict[str, int] = {}
            for p in people:
                r = await client.get("/wallet", headers=p.headers)
                assert r.status_code == 200, r.text
                balances[p.name] = int(r.json()["balance"])
            expected = dict.fromkeys(names, START)
            for t in accepted:
                if t.status == "completed":
                    expected[t.sender.name] -= t.amount
                    expected[t.to] += t.amount
            assert sum(balances.values()) == START * len(people)
            assert balances == expected
            assert any(t.status == "refunded" for t in accepted)
            await wait_until(
                lambda: _pending_outbox(tmp_path / "data") == 0,
                timeout_s=30,
                what="an empty outbox",
            )
    except BaseException:
        print(server.log())
        raise
    finally:
        server.stop()
