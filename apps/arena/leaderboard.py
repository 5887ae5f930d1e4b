"""The leaderboard: a projection of POINTS events, read through the cache.

The projection lives on the shard of the key "leaderboard" and is written
exactly once per event (inbox). Reads are cached for two seconds: a
leaderboard a moment old is fine, a stampede of reads on one shard is not.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from apps.arena import topics
from apps.arena.schemas import Leaderboard, LeaderRow
from tenfold.data.base import Connection
from tenfold.events import EventBus
from tenfold.events.base import Event
from tenfold.gateway import RuntimeDep

router = APIRouter(tags=["leaderboard"])


@router.get("/leaderboard", response_model=Leaderboard)
async def leaderboard(
    rt: RuntimeDep, limit: Annotated[int, Query(ge=1, le=100)] = 10
) -> Leaderboard:
    async def load() -> list[dict[str, Any]]:
        async with rt.db.shard_for(topics.LEADERBOARD_KEY) as conn:
            rows = await conn.fetch(
                "SELECT username, points FROM arena_leaderboard "
                "ORDER BY points DESC, username LIMIT $1",
                limit,
            )
        return [{"username": r["username"], "points": int(r["points"])} for r in rows]

    rows = await rt.cache.get_or_load(f"arena:leaderboard:{limit}", load, ttl_s=2)
    return Leaderboard(items=[LeaderRow(**r) for r in rows])


def register_consumers(bus: EventBus) -> None:
    @bus.consumer(topics.POINTS, group="leaderboard", shard_writes=True)
    async def project(event: Event, conn: Connection) -> None:
        p = event.data()
        await conn.execute(
            "INSERT INTO arena_leaderboard (slot, user_id, username, points) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (user_id) "
            "DO UPDATE SET points = arena_leaderboard.points + excluded.points",
            conn.slot,
            p["user_id"],
            p["username"],
            p["delta"],
        )
