"""The peer of `gateway_overhead`: a bare FastAPI app that inserts arena's message row.

One endpoint, `POST /rooms/{room_id}/messages`, with the same request and
response bodies as arena's (`MessageIn` → `MessageOut`, 201): it validates the
body, then runs one `INSERT INTO arena_messages` (the same columns arena
fills) through an asyncpg pool of TENFOLD_POOL_MAX_SIZE connections (10, as
arena's default) on TENFOLD_SHARD_URL. No auth, no membership check, no
outbox row, no middleware. Served by `tenfold up benchmarks.bare_messages:create_app`.

`create_app_outbox` is a second, fairer-to-arena peer: the same endpoint doing
what a hand-rolled transactional outbox does, the message row and an outbox
row (the event's id, topic, key, slot, JSON payload) in one transaction, with
nothing relaying it. arena against it isolates tenfold's own cost from the
price of the outbox guarantee that the single insert does not give.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator

import asyncpg
import orjson
from fastapi import FastAPI, Response

from apps.arena.schemas import MessageIn, MessageOut
from tenfold.config import load_settings
from tenfold.gateway.heap import tune_gc

SQL = (
    "INSERT INTO arena_messages (slot, id, room_id, author_id, author, body, idem_key, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)


OUTBOX_DDL = (
    "CREATE TABLE IF NOT EXISTS bench_outbox (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, "
    "topic TEXT NOT NULL, event_key TEXT NOT NULL, slot INTEGER NOT NULL, payload BYTEA NOT NULL, "
    "created_at DOUBLE PRECISION NOT NULL, published_at DOUBLE PRECISION)"
)
OUTBOX_SQL = (
    "INSERT INTO bench_outbox (event_id, topic, event_key, slot, payload, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)


def create_app_outbox() -> FastAPI:
    """The peer with a hand-rolled transactional outbox (see the module docstring)."""
    return create_app(outbox=True)


def create_app(outbox: bool = False) -> FastAPI:
    url = os.environ["TENFOLD_SHARD_URL"]
    size = int(os.environ.get("TENFOLD_POOL_MAX_SIZE", "10"))
    ids = itertools.count(time.time_ns() // 1000 * 1000)
    state: dict[str, asyncpg.Pool] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["pool"] = await asyncpg.create_pool(url, min_size=size, max_size=size)
        if outbox:
            await state["pool"].execute(OUTBOX_DDL)
        # The collector settings tenfold applies to its apps (tenfold.gateway.heap),
        # so the comparison measures the stack, not the collector's settings.
        tune_gc(load_settings().gc_gen0_threshold)
        yield
        await state["pool"].close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"alive":true}', media_type="application/json")

    @app.post("/rooms/{room_id}/messages", status_code=201, response_model=MessageOut)
    async def send_message(room_id: int, body: MessageIn) -> MessageOut:
        now, message_id = time.time(), next(ids)
        async with state["pool"].acquire() as conn:
            if not outbox:
                await conn.execute(
                    SQL, room_id % 4096, message_id, room_id, 1, "bench", body.body, None, now
                )
            else:
                payload = orjson.dumps({"id": str(message_id), "body": body.body})
                async with conn.transaction():
                    await conn.execute(
                        SQL, room_id % 4096, message_id, room_id, 1, "bench", body.body, None, now
                    )
                    await conn.execute(
                        OUTBOX_SQL,
                        str(message_id),
                        "arena.messages",
                        f"room:{room_id}",
                        room_id % 4096,
                        payload,
                        now,
                    )
        return MessageOut(
            id=str(message_id), room_id=str(room_id), author="bench", body=body.body, created_at=now
        )

    return app
