"""Carrying a moving slot's unpublished events to its new owner at the switch.

Published rows stay where they are (the outbox's retention removes them).
Unpublished ones are marked published on the old owner and inserted, with the
same event id, into the new owner's outbox, in the transaction that opens the
slots there: the new owner's relay publishes them before any event written
after the switch. A relay of the old owner that read a row just before it was
marked still publishes it once more; the stream drops it (publishing is
idempotent per event id within the dedup window, `tenfold.events.base`), and
exactly-once consumers skip it by their inbox.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tenfold.reshard.capture import ShardSide
from tenfold.reshard.slots import to_ranges

__all__ = ["carry_outbox"]

_COLS = ("event_id", "topic", "event_key", "slot", "payload", "headers", "created_at")


async def carry_outbox(
    frm: ShardSide,
    to: ShardSide,
    slots: Sequence[int],
    move_id: str,
    *,
    open_target: str | None,
    set_target_state: bool = True,
) -> int:
    """Move unpublished outbox rows of `slots` from `frm` to `to`, and (unless
    `set_target_state` is False) set the slots' state on `to` to `open_target`
    (None: plain owner) in the same transaction; return how many rows moved."""
    cols = ", ".join(_COLS)
    now = time.time()
    async with frm.pool.acquire() as fconn, fconn.transaction():
        carried = []
        for lo, hi in to_ranges(slots):
            carried += await fconn.fetch(
                "UPDATE tenfold_outbox SET published_at = $1 WHERE slot BETWEEN $2 AND $3 "
                f"AND published_at IS NULL RETURNING {cols}",
                now,
                lo,
                hi,
            )
        carried.sort(key=lambda r: (r["created_at"], r["event_id"]))
        async with to.pool.acquire() as tconn, tconn.transaction():
            if set_target_state:
                await to.set_state_in(tconn, slots, open_target, move_id)
            if carried:
                await tconn.executemany(
                    f"INSERT INTO tenfold_outbox ({cols}) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                    "ON CONFLICT (event_id) DO NOTHING",
                    [tuple(r) for r in carried],
                )
    return len(carried)
