"""`tenfold events` against a real JetStream: status, dead letters, replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path

import pytest

from tenfold import ShardedDatabase, load_settings
from tenfold.events import EventBus, RetryPolicy
from tenfold.events.nats import dlq_stream_name, stream_name
from tests.integration.test_cli import tenfold


async def _seed(topic: str, nats_url: str) -> None:
    """Emit 5 events through the outbox; a consumer dead-letters the one with n == 3."""
    settings = load_settings(events_url=nats_url, relay_poll_interval_s=0.02)
    async with ShardedDatabase(settings) as db:
        await db.migrate()
        bus = EventBus(db)
        bus.topic(topic, partitions=2)
        handled: list[int] = []

        @bus.consumer(topic, group="audit", retry=RetryPolicy(3, 0.01, 0.02))
        async def audit(delivery):  # type: ignore[no-untyped-def]
            if delivery.event.data()["n"] == 3:
                raise ValueError("poison")
            handled.append(delivery.event.data()["n"])

        await bus.start()
        await bus.wait_attached()
        for n in range(5):
            async with db.shard_for(f"k{n}") as conn, conn.transaction():
                await bus.emit(conn, topic, f"k{n}", {"n": n})
        async with asyncio.timeout(20):
            while len(handled) < 4 or not await bus.backend.dead_letters(bus.topics[topic]):
                await asyncio.sleep(0.05)
        await bus.stop()


async def _drop_streams(nats_url: str, topic: str) -> None:
    import nats

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for name in (stream_name(topic), dlq_stream_name(topic)):
        with contextlib.suppress(Exception):  # already gone
            await js.delete_stream(name)
    await nc.close()


@pytest.mark.timeout(120)
def test_events_commands_show_and_operate_the_dlq(nats_url: str, tmp_path: Path) -> None:
    topic = f"cli{uuid.uuid4().hex[:8]}.orders"
    env = {"TENFOLD_EVENTS_URL": nats_url}
    asyncio.run(_seed(topic, nats_url))
    try:
        status = tenfold("events", "status", "--sample", "0.2", "--json", env=env)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        mine = next(t for t in report["topics"] if t["topic"] == topic)
        assert mine["messages"] == 5 and mine["dlq_size"] == 1 and mine["partitions"] == 2
        group = next(g for g in report["groups"] if g["topic"] == topic)
        assert group["group"] == "audit" and group["lag"] == 0
        assert all(n == 0 for n in report["outbox_pending"].values())

        listed = json.loads(tenfold("events", "dlq", "list", "-t", topic, "--json", env=env).stdout)
        [letter] = listed["dead_letters"]
        assert (
            letter["attempts"] == 3 and "poison" in letter["error"] and letter["group"] == "audit"
        )

        shown = tenfold(
            "events", "dlq", "show", "-t", topic, str(letter["sequence"]), "--json", env=env
        )
        assert json.loads(shown.stdout)["event"]["payload"] == '{"n":3}'

        missing = tenfold("events", "dlq", "show", "-t", topic, "999", env=env)
        assert missing.returncode == 2 and "no dead letter 999" in missing.stderr

        both = tenfold("events", "dlq", "drop", "-t", topic, "1", "--all", env=env)
        assert both.returncode == 2 and "not both" in both.stderr

        replayed = tenfold("events", "dlq", "replay", "-t", topic, "--all", "--json", env=env)
        assert json.loads(replayed.stdout)["replayed"] == [letter["sequence"]]
        after = json.loads(tenfold("events", "status", "--sample", "0", "--json", env=env).stdout)
        mine = next(t for t in after["topics"] if t["topic"] == topic)
        assert mine["messages"] == 6 and mine["dlq_size"] == 0  # republished, DLQ emptied

        rewound = tenfold(
            "events", "replay", "-t", topic, "-g", "audit", "--from-seq", "2", "--json", env=env
        )
        assert rewound.returncode == 0, rewound.stderr
        lag = json.loads(tenfold("events", "status", "--sample", "0", "--json", env=env).stdout)
        group = next(g for g in lag["groups"] if g["topic"] == topic)
        assert group["lag"] == 5  # sequences 2..6 are to be handled again

        bad_time = tenfold(
            "events", "replay", "-t", topic, "-g", "audit", "--from", "yesterday", env=env
        )
        assert bad_time.returncode == 2 and "not an ISO time" in bad_time.stderr
        unknown = tenfold("events", "dlq", "list", "-t", "no.such.topic", env=env)
        assert unknown.returncode == 2 and "does not exist" in unknown.stderr
    finally:
        asyncio.run(_drop_streams(nats_url, topic))


def test_events_status_without_a_broker_is_one_line() -> None:
    result = tenfold(
        "events",
        "status",
        env={"TENFOLD_EVENTS_URL": "nats://127.0.0.1:1", "TENFOLD_EVENTS_CONNECT_TIMEOUT_S": "0.5"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unavailable" in result.stderr and "nats://127.0.0.1:1" in result.stderr
