"""A process for the chaos tests: `python -m tests.integration.chaos_worker ROLE --config JSON`.

Roles (tests/integration/test_chaos.py starts, SIGKILLs and replaces them):

- `emitter`: writes `count` source rows `src(id, slot, n, event_id)` at `rate` rows per
  second, each with its event emitted in the same shard transaction, then exits 0.
- `relay`: an `EventBus` with relays only (no consumers), until killed.
- `node`: relays and the consumer in one process, as the embedded mode (`memory://`, whose
  stream lives in the process) runs them: several nodes share SQLite shard files.
- `consumer`: an `EventBus` with one `shard_writes=True` consumer only, until killed. The
  handler inserts one `effects(event_id, src_id, slot, n, pid, attempt)` row. `effects` has no
  unique constraint on `event_id`, so a double apply shows up as two rows: exactly-once
  rests on the inbox alone.

The JSON config holds `settings` (keyword arguments of `Settings`) and the role's
parameters (`topic`, `partitions`, `group`, `count`, `rate`, `first`, `handler_delay_s`,
`ack_delay_s`). A worker prints `READY` on stdout once it runs and logs to stderr. A
consumer logs `REDELIVERED event ID attempt N applied|skipped-by-inbox` for each delivery
with N > 1 or that the inbox skipped: the evidence that kills landed between fetch and
ack, and of what the inbox did about it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
from typing import Any

from tenfold import ShardedDatabase
from tenfold.config import Settings
from tenfold.data.base import Connection
from tenfold.events import Delivery, Event, EventBus

ROLES = ("emitter", "relay", "consumer", "node")

# The app tables of the chaos tests, created on every shard by the test.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS src ("
    " id BIGINT PRIMARY KEY, slot INTEGER NOT NULL, n BIGINT NOT NULL, event_id TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS src_slot ON src (slot)",
    # Deliberately no unique constraint on event_id: a double apply must be visible.
    "CREATE TABLE IF NOT EXISTS effects ("
    " event_id TEXT NOT NULL, src_id BIGINT NOT NULL, slot INTEGER NOT NULL,"
    " n BIGINT NOT NULL, pid INTEGER NOT NULL, attempt INTEGER NOT NULL,"
    " applied_at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS effects_slot ON effects (slot)",
)


def source_key(src_id: int) -> str:
    return f"src{src_id}"


def source_n(src_id: int) -> int:
    return src_id * 7 + 3


# The NATS delivery attempt of the event being handled (for the effect row and the log).
_attempt: contextvars.ContextVar[int] = contextvars.ContextVar("attempt", default=0)


def say(text: str) -> None:
    print(text, flush=True)


async def _open(config: dict[str, Any]) -> tuple[ShardedDatabase, EventBus]:
    db = ShardedDatabase(Settings(**config["settings"]))
    await db.open(ids=False)  # no id-worker lease: killed processes would leak them
    bus = EventBus(db)
    bus.topic(config["topic"], partitions=config["partitions"])
    return db, bus


async def emitter(config: dict[str, Any]) -> None:
    db, bus = await _open(config)
    topic, first, count, rate = config["topic"], config["first"], config["count"], config["rate"]
    say("READY")
    start = time.monotonic()
    try:
        for i, src_id in enumerate(range(first, first + count)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            key = source_key(src_id)
            async with db.shard_for(key) as conn, conn.transaction():
                event_id = await bus.emit(
                    conn, topic, key, {"src_id": src_id, "n": source_n(src_id)}
                )
                await conn.insert(
                    "src", {"id": src_id, "n": source_n(src_id), "event_id": event_id}
                )
            if (i + 1) % 500 == 0:
                say(f"emitted {i + 1}")
        say(f"DONE {count} in {time.monotonic() - start:.1f}s")
    finally:
        await db.close()


async def relay(config: dict[str, Any]) -> None:
    db, bus = await _open(config)
    await bus.start(relays=True, consumers=False)
    say(f"READY relays={[r.owner for r in bus.relays]}")
    await _until_terminated()
    await bus.stop()
    await db.close()


async def node(config: dict[str, Any]) -> None:
    await consumer(config, relays=True)


async def consumer(config: dict[str, Any], *, relays: bool = False) -> None:
    db, bus = await _open(config)
    pid = os.getpid()
    delay_s = float(config.get("handler_delay_s", 0.0))
    ack_delay_s = float(config.get("ack_delay_s", 0.0))

    @bus.consumer(config["topic"], group=config["group"], shard_writes=True)
    async def apply(event: Event, conn: Connection) -> None:
        data = event.data()
        await conn.insert(
            "effects",
            {
                "event_id": event.id,
                "src_id": data["src_id"],
                "n": data["n"],
                "pid": pid,
                "attempt": _attempt.get(),
                "applied_at": time.time(),
            },
        )
        applied.add(event.id)
        if delay_s:
            # Widens the window in which a SIGKILL lands inside the handler's transaction.
            await asyncio.sleep(random.uniform(0, delay_s))

    applied: set[str] = set()
    spec = bus.consumers[0]
    inner = spec.handler  # the inbox wrapper around `apply`

    async def observed(delivery: Delivery) -> None:
        # Logs redeliveries (a killed consumer's unacked event, or any event the inbox
        # had already seen) and whether the inbox skipped them (applied before the
        # kill, not acked) or they were applied now.
        token = _attempt.set(delivery.attempt)
        try:
            await inner(delivery)
            if ack_delay_s:
                # Widens the window between the inbox commit and the ack, in which a
                # SIGKILL leaves an applied but unacked event (redelivered, then skipped).
                await asyncio.sleep(random.uniform(0, ack_delay_s))
            fresh = delivery.event.id in applied
            if delivery.attempt > 1 or not fresh:
                # attempt 1 and skipped: the broker delivered an acked event again as new
                # (after a NATS crash the consumer's ack state can be older than its acks).
                outcome = "applied" if fresh else "skipped-by-inbox"
                logging.getLogger("chaos").info(
                    "REDELIVERED event %s attempt %d %s",
                    delivery.event.id,
                    delivery.attempt,
                    outcome,
                )
        finally:
            _attempt.reset(token)
            applied.discard(delivery.event.id)

    bus.consumers[0] = dataclasses.replace(spec, handler=observed)
    await bus.start(relays=relays, consumers=True)
    say("READY")
    await _until_terminated()
    await bus.stop()
    await db.close()


async def _until_terminated() -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.chaos_worker")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--config", required=True, help="JSON: settings and role parameters")
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.role}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    run = {"emitter": emitter, "relay": relay, "consumer": consumer, "node": node}[args.role]
    asyncio.run(run(config))


if __name__ == "__main__":
    main()
