"""Ids that know their shard: 64-bit, time-ordered, carrying the owner's slot.

Layout (Instagram's scheme, with the shard field widened to a slot)::

    0 | 41 bits: ms since 2024-01-01 UTC | 12 bits: slot | 6 bits: worker | 4 bits: sequence

- The sign bit is 0, so ids fit a signed BIGINT and sort by creation time.
- `slot_of_id(id)` is the slot of the owning key, so a row can be routed by
  its id alone, and it moves with its slot when resharding.
- 41 bits of milliseconds last until 2093.

Invariants:
- Within one generator, the ids of one slot strictly increase (the sequence is
  per slot; when 16 ids were issued for one slot in one millisecond, the next
  waits for the next millisecond; a clock that steps back is waited out, never
  reused). Ids of different slots order by millisecond only.
- Two generators never issue the same id as long as they hold different
  worker numbers. Worker numbers are leased from the catalog once at start-up
  (`tenfold.data.catalog.Catalog.lease_worker`), not per id: 63 bits cannot
  hold a timestamp, a slot and a random node id wide enough to make
  collisions impossible, so the lease is the one piece of coordination, and a
  generator whose lease lapsed refuses to issue ids rather than risk a clash.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tenfold.errors import KeyspaceError
from tenfold.keyspace import SLOTS, Key, slot_of

__all__ = [
    "ID_EPOCH_MS",
    "MAX_WORKERS",
    "IdGenerator",
    "created_ms_of_id",
    "slot_of_id",
    "worker_of_id",
]

ID_EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SEQUENCE_BITS = 4
WORKER_BITS = 6
SLOT_BITS = 12
TIME_BITS = 41
MAX_WORKERS = 1 << WORKER_BITS
_SEQ_MASK = (1 << SEQUENCE_BITS) - 1
_WORKER_SHIFT = SEQUENCE_BITS
_SLOT_SHIFT = SEQUENCE_BITS + WORKER_BITS
_TIME_SHIFT = _SLOT_SHIFT + SLOT_BITS
_MAX_TIME = (1 << TIME_BITS) - 1
assert 1 << SLOT_BITS == SLOTS


def slot_of_id(id_: int) -> int:
    """The slot embedded in an id made by `IdGenerator`."""
    _check_id(id_)
    return (id_ >> _SLOT_SHIFT) & (SLOTS - 1)


def created_ms_of_id(id_: int) -> int:
    """Unix milliseconds at which the id was made."""
    _check_id(id_)
    return (id_ >> _TIME_SHIFT) + ID_EPOCH_MS


def worker_of_id(id_: int) -> int:
    _check_id(id_)
    return (id_ >> _WORKER_SHIFT) & (MAX_WORKERS - 1)


def _check_id(id_: int) -> None:
    if type(id_) is not int or not 0 < id_ < 1 << 63:
        raise KeyspaceError(f"not a tenfold id (a positive 63-bit int): {id_!r}")


class IdGenerator:
    """Issues ids for keys or slots. Thread-safe; `next_id` never blocks on I/O.

    Args:
        worker: this process's worker number, 0..63, unique among live
            generators (lease it with `Catalog.lease_worker`).
        clock_ms: returns Unix milliseconds; injected for tests.
        valid_until: returns False once the worker lease has lapsed; the
            generator then raises instead of issuing ids.
    """

    def __init__(
        self,
        worker: int,
        *,
        clock_ms: Callable[[], int] | None = None,
        valid_until: Callable[[], bool] | None = None,
    ) -> None:
        if not 0 <= worker < MAX_WORKERS:
            raise KeyspaceError(f"id worker must be 0..{MAX_WORKERS - 1}, got {worker}")
        self.worker = worker
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._valid = valid_until
        self._lock = threading.Lock()
        # Per slot: (last millisecond used, last sequence used in it).
        self._last: dict[int, tuple[int, int]] = {}

    def next_id(self, key: Key) -> int:
        """A new id owned by `key`'s slot."""
        return self.next_id_for_slot(slot_of(key))

    def next_id_for_slot(self, slot: int) -> int:
        """A new id in `slot` (0..4095)."""
        if not 0 <= slot < SLOTS:
            raise KeyspaceError(f"slot {slot} is outside 0-{SLOTS - 1}")
        if self._valid is not None and not self._valid():
            raise KeyspaceError(
                f"id worker {self.worker}'s lease has lapsed; another process may now hold it, "
                "so no ids are issued until the lease is renewed (is the catalog reachable?)"
            )
        with self._lock:
            last_ms, last_seq = self._last.get(slot, (-1, _SEQ_MASK))
            now = self._clock_ms() - ID_EPOCH_MS
            if now < last_ms or (now == last_ms and last_seq == _SEQ_MASK):
                now = self._wait_past(last_ms)
            seq = last_seq + 1 if now == last_ms else 0
            if now > _MAX_TIME:
                raise KeyspaceError("id timestamp overflow: the 41-bit clock ran out (year 2093)")
            self._last[slot] = (now, seq)
            return (
                (now << _TIME_SHIFT) | (slot << _SLOT_SHIFT) | (self.worker << _WORKER_SHIFT) | seq
            )

    def _wait_past(self, last_ms: int) -> int:
        # Sequence exhausted or clock stepped back: spin (sub-millisecond) until
        # the clock passes the last millisecond used, never reuse it.
        while True:
            now = self._clock_ms() - ID_EPOCH_MS
            if now > last_ms:
                return now
            time.sleep(0.0002)
