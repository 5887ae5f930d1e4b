"""Rooms and their messages. Only members read or post in a room.

A room, its members and its messages live on the shard of the room id (made
in a random slot, so rooms spread over shards). Membership checks go through
the tiered cache and are invalidated on leave; "my rooms" is a projection on
the user's shard fed by membership events.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from apps.arena import ids, topics
from apps.arena.schemas import (
    MessageIn,
    MessageOut,
    MessagePage,
    RoomIn,
    RoomList,
    RoomOut,
)
from tenfold.cache import slot_tag
from tenfold.data.base import Connection, Record
from tenfold.errors import ConstraintViolation, TokenInvalid
from tenfold.events import EventBus
from tenfold.events.base import Event
from tenfold.gateway import CurrentUser, Principal, Problem, RuntimeDep, runtime_of, user_of
from tenfold.gateway.idempotency import idempotency_key as idempotency_key_of
from tenfold.gateway.idempotency import idempotency_openapi
from tenfold.gateway.runtime import Runtime
from tenfold.ids import slot_of_id

router = APIRouter(prefix="/rooms", tags=["rooms"])


async def _membership(rt: Runtime, room_id: int, user_id: int) -> dict[str, Any]:
    async def load() -> dict[str, Any]:
        async with rt.db.shard_for_id(room_id) as conn:
            row = await conn.fetchrow(
                "SELECT r.name, r.owner_id, m.user_id AS member FROM arena_rooms r "
                "LEFT JOIN arena_members m ON m.room_id = r.id AND m.user_id = $2 "
                "WHERE r.id = $1",
                room_id,
                user_id,
            )
        if row is None:
            return {"exists": False, "member": False}
        return {"exists": True, "member": row["member"] is not None, "name": row["name"]}

    result: dict[str, Any] = await rt.cache.get_or_load(
        f"arena:member:{room_id}:{user_id}",
        load,
        ttl_s=60,
        tags=(slot_tag(slot_of_id(room_id)),),  # a reshard of the room's slot drops it
    )
    return result


async def _require_member(rt: Runtime, room_id: int, user_id: int) -> dict[str, Any]:
    state = await _membership(rt, room_id, user_id)
    if not state["exists"]:
        raise Problem(404, f"no room {room_id}", slug="no-such-room")
    if not state["member"]:
        raise Problem(
            403, "only members of this room may do that; join it first", slug="not-member"
        )
    return state


async def _add_member(rt: Runtime, conn: Connection, room: dict[str, Any], user: Principal) -> bool:
    added = await conn.execute(
        "INSERT INTO arena_members (slot, room_id, user_id, username, joined_at) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        conn.slot,
        room["id"],
        ids.user_id(user),
        user.claims.get("name", ""),
        time.time(),
    )
    if added:
        await rt.bus.emit(
            conn,
            topics.MEMBERSHIP,
            user.claims.get("name", user.subject),
            {
                "op": "join",
                "user_id": ids.user_id(user),
                "room_id": room["id"],
                "name": room["name"],
            },
        )
    return bool(added)


# Messages first: routes are matched in order, and these are the busiest.
@router.post(
    "/{room_id}/messages",
    status_code=201,
    response_model=MessageOut,
    responses={
        200: {"model": MessageOut, "description": "A retry (same Idempotency-Key): the original"}
    },
    openapi_extra=idempotency_openapi(),
)
async def send_message(
    room_id: str, body: MessageIn, request: Request
) -> MessageOut | JSONResponse:
    # `request` rather than CurrentUser / RuntimeDep / Header() / Response
    # parameters: this is arena's hottest route, and each of those costs
    # FastAPI's dependency machinery on every call (docs/load-testing.md).
    user = user_of(request)
    rt = runtime_of(request)
    idempotency_key = idempotency_key_of(request)
    rid = ids.room_id(room_id)
    author_id = ids.user_id(user)
    await _require_member(rt, rid, author_id)
    author = user.claims.get("name", user.subject)
    now = time.time()
    message_id = rt.db.new_id_beside(rid)  # routes like its room
    row = {
        "id": message_id,
        "room_id": rid,
        "author_id": author_id,
        "author": author,
        "body": body.body,
        "idem_key": idempotency_key,
        "created_at": now,
    }
    event = {
        "id": str(message_id),
        "room_id": str(rid),
        "author": author,
        "body": body.body,
        "created_at": now,
    }

    async def insert(conn: Connection) -> None:
        # The message row and its outbox row in one statement (one round trip).
        await rt.bus.insert_and_emit(
            conn, "arena_messages", row, topics.MESSAGES, f"room:{rid}", event
        )

    async def insert_once(conn: Connection) -> Any:
        assert idempotency_key is not None
        replay = await _stored_message(conn, rid, author_id, idempotency_key)
        if replay is None:
            await insert(conn)
        return replay

    # transaction_for_id: a write refused mid-reshard (SlotMoved) runs again on the new owner.
    if idempotency_key is None:
        await rt.db.transaction_for_id(rid, insert, transaction=False)
    else:
        try:
            replay = await rt.db.transaction_for_id(rid, insert_once)
        except ConstraintViolation:
            # A concurrent request with the same key committed first: the unique
            # (room_id, author_id, idem_key) index refused this insert, and this
            # transaction rolled back. Its stored message is the answer.
            async with rt.db.shard_for_id(rid) as conn:
                replay = await _stored_message(conn, rid, author_id, idempotency_key)
            if replay is None:
                raise Problem(
                    409,
                    "a request with this Idempotency-Key is in progress; retry it",
                    slug="idempotency-key-in-progress",
                ) from None
        if replay is not None:
            if replay["body"] != body.body:
                raise Problem(
                    422,
                    "this Idempotency-Key was used for a different message",
                    slug="idempotency-key-reused",
                )
            original = MessageOut(
                id=str(replay["id"]),
                room_id=str(rid),
                author=author,
                body=replay["body"],
                created_at=replay["created_at"],
            )
            # a replay: the original, with 200 rather than 201
            return JSONResponse(original.model_dump(), status_code=200)
    return MessageOut(
        id=str(message_id), room_id=str(rid), author=author, body=body.body, created_at=now
    )


async def _stored_message(conn: Connection, rid: int, author_id: int, key: str) -> Record | None:
    """The message this author already sent to this room with this Idempotency-Key."""
    return await conn.fetchrow(
        "SELECT id, body, created_at FROM arena_messages "
        "WHERE room_id = $1 AND author_id = $2 AND idem_key = $3",
        rid,
        author_id,
        key,
    )


@router.get("/{room_id}/messages", response_model=MessagePage)
async def list_messages(
    room_id: str,
    user: CurrentUser,
    rt: RuntimeDep,
    before: Annotated[str | None, Query(max_length=20, pattern=r"^[0-9]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> MessagePage:
    rid = ids.room_id(room_id)
    await _require_member(rt, rid, ids.user_id(user))
    cursor = min(int(before), ids.MAX_ID) if before is not None else ids.MAX_ID
    async with rt.db.shard_for_id(rid) as conn:
        rows = await conn.fetch(
            "SELECT id, author, body, created_at FROM arena_messages "
            "WHERE slot = $4 AND room_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            rid,
            cursor,
            limit,
            conn.slot,
        )
    items = [
        MessageOut(
            id=str(r["id"]),
            room_id=str(rid),
            author=r["author"],
            body=r["body"],
            created_at=r["created_at"],
        )
        for r in rows
    ]
    next_cursor = items[-1].id if len(items) == limit else None
    return MessagePage(items=items, next_cursor=next_cursor)


@router.post("", status_code=201, response_model=RoomOut)
async def create_room(body: RoomIn, user: CurrentUser, rt: RuntimeDep) -> RoomOut:
    owner_id = ids.user_id(user)
    room_id = rt.db.new_id(secrets.token_hex(8))  # a random slot: rooms spread over shards
    room = {"id": room_id, "name": body.name}
    async with rt.db.shard_for_id(room_id) as conn, conn.transaction():
        await conn.insert(
            "arena_rooms",
            {
                "id": room_id,
                "name": body.name,
                "owner_id": owner_id,
                "created_at": time.time(),
            },
        )
        await _add_member(rt, conn, room, user)
    await rt.cache.invalidate(f"arena:member:{room_id}:{owner_id}")
    return RoomOut(id=str(room_id), name=body.name, owner_id=str(owner_id))


@router.get("/mine", response_model=RoomList)
async def my_rooms(user: CurrentUser, rt: RuntimeDep) -> RoomList:
    user_id = ids.user_id(user)
    async with rt.db.shard_for_id(user_id) as conn:
        rows = await conn.fetch(
            "SELECT room_id, name FROM arena_my_rooms WHERE user_id = $1 "
            "ORDER BY joined_at LIMIT 500",
            user_id,
        )
    return RoomList(
        items=[RoomOut(id=str(r["room_id"]), name=r["name"], owner_id="") for r in rows]
    )


@router.post("/{room_id}/join", response_model=RoomOut)
async def join(room_id: str, user: CurrentUser, rt: RuntimeDep) -> RoomOut:
    rid = ids.room_id(room_id)
    user_id = ids.user_id(user)
    async with rt.db.shard_for_id(rid) as conn, conn.transaction():
        row = await conn.fetchrow("SELECT name, owner_id FROM arena_rooms WHERE id = $1", rid)
        if row is None:
            raise Problem(404, f"no room {rid}", slug="no-such-room")
        await _add_member(rt, conn, {"id": rid, "name": row["name"]}, user)
    await rt.cache.invalidate(f"arena:member:{rid}:{user_id}")
    return RoomOut(id=str(rid), name=row["name"], owner_id=str(row["owner_id"]))


@router.post("/{room_id}/leave", status_code=204)
async def leave(room_id: str, user: CurrentUser, rt: RuntimeDep) -> Response:
    rid = ids.room_id(room_id)
    user_id = ids.user_id(user)
    await _require_member(rt, rid, user_id)
    async with rt.db.shard_for_id(rid) as conn, conn.transaction():
        removed = await conn.execute(
            "DELETE FROM arena_members WHERE room_id = $1 AND user_id = $2", rid, user_id
        )
        if removed:
            await rt.bus.emit(
                conn,
                topics.MEMBERSHIP,
                user.claims.get("name", user.subject),
                {"op": "leave", "user_id": user_id, "room_id": rid},
            )
    await rt.cache.invalidate(f"arena:member:{rid}:{user_id}")
    # Access ends with membership: open /ws subscriptions to the room, on every
    # node, before the 204 (the membership consumer below repeats it durably).
    await rt.realtime.revoke(f"room:{rid}", str(user_id))
    return Response(status_code=204)


def register_realtime(rt: Runtime) -> None:
    """Realtime: room channels for members, committed messages fanned out to them.

    - "room:<id>": members may subscribe, see presence and send ephemeral frames
      (typing indicators); stored messages are only ever published by the
      consumer below, from committed `arena.messages` events, never by clients.
    - "user:<id>": the user's own channel (wallet/points notifications).
    """

    async def authorize(principal: Principal, channel: str, action: str) -> bool:
        kind, _, ident = channel.partition(":")
        if kind == "user":
            return ident == principal.subject and action == "read"
        # An id that cannot exist (room:0, room:-1, 2^63) is forbidden like any
        # room the caller is not in; the router would refuse it as a KeyspaceError,
        # which the hub reports as `unavailable`.
        room_id = ids.parse_id(ident)
        if kind != "room" or action == "publish" or room_id is None:
            return False
        try:
            user_id = ids.user_id(principal)
        except TokenInvalid:
            return False
        state = await _membership(rt, room_id, user_id)
        return bool(state["member"])

    rt.realtime.authorize = authorize

    @rt.bus.consumer(topics.MESSAGES, group="realtime_rooms")
    async def fan_out(delivery: Any) -> None:
        event = delivery.event
        # the payload is the message as JSON already (send_message emitted a dict)
        await rt.realtime.publish_json(event.key, event.payload)

    @rt.bus.consumer(topics.MEMBERSHIP, group="realtime_membership")
    async def end_access(delivery: Any) -> None:
        # The leave handler revokes at once; this covers a process that died
        # between the commit and that call. A user who joined again meanwhile
        # keeps their new subscriptions.
        m = delivery.event.data()
        if m["op"] != "leave":
            return
        state = await _membership(rt, m["room_id"], m["user_id"])
        if not state["member"]:
            await rt.realtime.revoke(f"room:{m['room_id']}", str(m["user_id"]))

    @rt.bus.consumer(topics.POINTS, group="realtime_points")
    async def points(delivery: Any) -> None:
        change = delivery.event.data()
        await rt.realtime.publish(
            f"user:{change['user_id']}", {"kind": "points", "delta": change["delta"]}
        )


def register_consumers(bus: EventBus) -> None:
    """The \"my rooms\" projection on each user's shard."""

    @bus.consumer(topics.MEMBERSHIP, group="my_rooms", shard_writes=True)
    async def my_rooms(event: Event, conn: Connection) -> None:
        m = event.data()
        if m["op"] == "join":
            await conn.execute(
                "INSERT INTO arena_my_rooms (slot, user_id, room_id, name, joined_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                conn.slot,
                m["user_id"],
                m["room_id"],
                m["name"],
                event.created_at,
            )
        else:
            await conn.execute(
                "DELETE FROM arena_my_rooms WHERE user_id = $1 AND room_id = $2",
                m["user_id"],
                m["room_id"],
            )
