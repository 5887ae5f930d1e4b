"""The points wallet and the cross-shard transfer saga.

    POST /wallet/transfers ──▶ sender's shard, one transaction:
        debit (balance >= amount, else 409) + transfer row "pending" + TRANSFERS event
    TRANSFERS consumer (exactly once, recipient's shard):
        recipient exists ─▶ credit + SETTLEMENTS {ok} + POINTS event
        no such user     ─▶ SETTLEMENTS {failed}
    SETTLEMENTS consumer (exactly once, sender's shard):
        ok     ─▶ transfer "completed" + POINTS event (sender's loss)
        failed ─▶ transfer "refunded" + balance restored (the compensation)

Every step is a local transaction with its outbox row, and every consumer
records the event id in the inbox in the same transaction, so a crash at any
point replays a step at most once in effect: the sum of all balances plus the
amounts in flight never changes.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from apps.arena import ids, topics
from apps.arena.schemas import TransferIn, TransferOut, WalletOut
from tenfold.data.base import Connection, Record
from tenfold.errors import ConstraintViolation
from tenfold.events import EventBus
from tenfold.events.base import Event
from tenfold.gateway import CurrentUser, Problem, RuntimeDep
from tenfold.gateway.idempotency import idempotency_key as idempotency_key_of
from tenfold.gateway.idempotency import idempotency_openapi
from tenfold.gateway.runtime import Runtime

router = APIRouter(prefix="/wallet", tags=["wallet"])


@router.get("", response_model=WalletOut)
async def balance(user: CurrentUser, rt: RuntimeDep) -> WalletOut:
    user_id = ids.user_id(user)
    async with rt.db.shard_for_id(user_id) as conn:
        value = await conn.fetchval("SELECT balance FROM arena_wallets WHERE user_id = $1", user_id)
    if value is None:
        raise Problem(404, "this account has no wallet", slug="no-wallet")
    return WalletOut(user_id=str(user_id), balance=int(value))


@router.post(
    "/transfers",
    status_code=202,
    response_model=TransferOut,
    openapi_extra=idempotency_openapi(required=True),
)
async def transfer(
    body: TransferIn, user: CurrentUser, rt: RuntimeDep, request: Request
) -> TransferOut:
    idempotency_key = idempotency_key_of(request, required=True)
    sender_id = ids.user_id(user)
    sender = str(user.claims.get("name", ""))
    if body.to == sender:
        raise Problem(422, "a transfer to yourself changes nothing", slug="self-transfer")
    try:

        async def debit(conn: Connection) -> tuple[Any, int]:
            row = await _stored_transfer(conn, sender_id, idempotency_key)
            if row is not None:
                return row, 0
            return None, await _debit(rt, conn, sender_id, sender, idempotency_key, body)

        # A debit refused mid-reshard (SlotMoved) runs again on the sender's new shard.
        stored, transfer_id = await rt.db.transaction_for_id(sender_id, debit)
        if stored is not None:
            return _replay(stored, body)
    except ConstraintViolation:
        # A concurrent request with the same key committed first: the unique
        # (sender_id, idem_key) index refused this transfer row, and the debit
        # rolled back with it. The stored transfer is the answer.
        async with rt.db.shard_for_id(sender_id) as conn:
            row = await _stored_transfer(conn, sender_id, idempotency_key)
        if row is None:
            raise Problem(
                409,
                "a request with this Idempotency-Key is in progress; retry it",
                slug="idempotency-key-in-progress",
            ) from None
        return _replay(row, body)
    return TransferOut(id=str(transfer_id), to=body.to, amount=body.amount, status="pending")


async def _stored_transfer(conn: Connection, sender_id: int, key: str) -> Record | None:
    """The transfer this sender already made with this Idempotency-Key."""
    return await conn.fetchrow(
        "SELECT id, recipient, amount, status, reason FROM arena_transfers "
        "WHERE sender_id = $1 AND idem_key = $2",
        sender_id,
        key,
    )


def _replay(row: Record, body: TransferIn) -> TransferOut:
    """The stored transfer as the answer to a retry, if the retry asks for the same one."""
    if row["recipient"] != body.to or row["amount"] != body.amount:
        raise Problem(
            422,
            "this Idempotency-Key was used for a different transfer",
            slug="idempotency-key-reused",
        )
    return _out(row)


async def _debit(
    rt: Runtime, conn: Connection, sender_id: int, sender: str, key: str, body: TransferIn
) -> int:
    """Debit the sender, record the transfer "pending" and emit it (in `conn`'s transaction)."""
    debited = await conn.execute(
        "UPDATE arena_wallets SET balance = balance - $2 WHERE user_id = $1 AND balance >= $2",
        sender_id,
        body.amount,
    )
    if not debited:
        raise Problem(409, "the balance does not cover this amount", slug="insufficient-funds")
    transfer_id = rt.db.new_id(sender)
    await conn.insert(
        "arena_transfers",
        {
            "id": transfer_id,
            "sender_id": sender_id,
            "recipient": body.to,
            "amount": body.amount,
            "idem_key": key,
            "status": "pending",
            "reason": None,
            "created_at": time.time(),
        },
    )
    await rt.bus.emit(
        conn,
        topics.TRANSFERS,
        body.to,
        {
            "transfer_id": transfer_id,
            "sender": sender,
            "sender_id": sender_id,
            "to": body.to,
            "amount": body.amount,
        },
    )
    return transfer_id


@router.get("/transfers/{transfer_id}", response_model=TransferOut)
async def transfer_status(transfer_id: str, user: CurrentUser, rt: RuntimeDep) -> TransferOut:
    tid = ids.transfer_id(transfer_id)
    sender_id = ids.user_id(user)
    async with rt.db.shard_for_id(sender_id) as conn:
        row = await conn.fetchrow(
            "SELECT id, recipient, amount, status, reason FROM arena_transfers "
            "WHERE id = $1 AND sender_id = $2",
            tid,
            sender_id,
        )
    if row is None:  # someone else's transfer is as absent as a missing one
        raise Problem(404, "no such transfer", slug="no-such-transfer")
    return _out(row)


def _out(row: Record) -> TransferOut:
    return TransferOut(
        id=str(row["id"]),
        to=row["recipient"],
        amount=int(row["amount"]),
        status=row["status"],
        reason=row["reason"],
    )


def register_consumers(bus: EventBus) -> None:
    """The saga's two steps and the leaderboard projection."""

    @bus.consumer(topics.TRANSFERS, group="wallet_credit", shard_writes=True)
    async def credit(event: Event, conn: Connection) -> None:
        t = event.data()
        user_id = await conn.fetchval("SELECT id FROM arena_users WHERE username = $1", t["to"])
        if user_id is None:
            await bus.emit(
                conn,
                topics.SETTLEMENTS,
                t["sender"],
                {"transfer_id": t["transfer_id"], "ok": False, "reason": "no such user"},
            )
            return
        await conn.execute(
            "UPDATE arena_wallets SET balance = balance + $2 WHERE user_id = $1",
            user_id,
            t["amount"],
        )
        await conn.insert(
            "arena_credits",
            {
                "transfer_id": t["transfer_id"],
                "user_id": user_id,
                "amount": t["amount"],
                "created_at": time.time(),
            },
        )
        await bus.emit(
            conn, topics.SETTLEMENTS, t["sender"], {"transfer_id": t["transfer_id"], "ok": True}
        )
        await bus.emit(
            conn,
            topics.POINTS,
            topics.LEADERBOARD_KEY,
            {"user_id": user_id, "username": t["to"], "delta": t["amount"]},
        )

    @bus.consumer(topics.SETTLEMENTS, group="wallet_settle", shard_writes=True)
    async def settle(event: Event, conn: Connection) -> None:
        s = event.data()
        row = await conn.fetchrow(
            "SELECT sender_id, amount, status FROM arena_transfers WHERE id = $1", s["transfer_id"]
        )
        if row is None or row["status"] != "pending":
            return
        if s["ok"]:
            await conn.execute(
                "UPDATE arena_transfers SET status = 'completed' WHERE id = $1", s["transfer_id"]
            )
            await bus.emit(
                conn,
                topics.POINTS,
                topics.LEADERBOARD_KEY,
                {"user_id": row["sender_id"], "username": event.key, "delta": -int(row["amount"])},
            )
            return
        await conn.execute(
            "UPDATE arena_transfers SET status = 'refunded', reason = $2 WHERE id = $1",
            s["transfer_id"],
            s.get("reason", "failed"),
        )
        await conn.execute(
            "UPDATE arena_wallets SET balance = balance + $2 WHERE user_id = $1",
            row["sender_id"],
            row["amount"],
        )
