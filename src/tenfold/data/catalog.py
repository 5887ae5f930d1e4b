"""The catalog database: the durable topology and the id-worker leases.

Topology rows are append-only, one per epoch; the current topology is the row
with the highest epoch. Saving is a compare-and-set: the new row's epoch must
be exactly one above the epoch the change was based on, and the primary key
makes two concurrent savers of the same epoch fail except one.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import orjson

from tenfold.data.base import Pool
from tenfold.errors import ConstraintViolation, KeyspaceError, QueryError, StaleEpoch
from tenfold.ids import MAX_WORKERS
from tenfold.keyspace import Topology

__all__ = ["Catalog", "WorkerLease"]


class WorkerLease:
    """A leased id-worker number; valid until `expires_at` unless renewed."""

    def __init__(self, worker: int, owner: str, expires_at: float) -> None:
        self.worker = worker
        self.owner = owner
        self.expires_at = expires_at

    def valid(self) -> bool:
        # A margin of a few seconds covers clock skew between processes.
        return time.time() < self.expires_at - 2.0


class Catalog:
    """Reads and writes the topology and worker leases in the catalog database."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def current_epoch(self) -> int:
        """The newest stored epoch, or 0 when no topology is stored yet."""
        async with self.pool.acquire() as conn:
            epoch = await conn.fetchval("SELECT MAX(epoch) FROM tenfold_topology")
        return int(epoch or 0)

    async def load_topology(self) -> Topology | None:
        """The current topology, or None when the catalog holds none yet."""
        async with self.pool.acquire() as conn:
            body = await conn.fetchval(
                "SELECT body FROM tenfold_topology ORDER BY epoch DESC LIMIT 1"
            )
        return None if body is None else Topology.from_dict(orjson.loads(body))

    async def save_topology(self, topology: Topology) -> None:
        """Store `topology`, which must be exactly one epoch past the current one.

        Raises:
            StaleEpoch: the catalog moved on; reload and derive the change again.
        """
        current = await self.current_epoch()
        if topology.epoch != current + 1:
            raise StaleEpoch(topology.epoch - 1, current)
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO tenfold_topology (epoch, body, created_at) VALUES ($1, $2, $3)",
                    topology.epoch,
                    orjson.dumps(topology.to_dict()).decode(),
                    time.time(),
                )
        except ConstraintViolation:
            raise StaleEpoch(topology.epoch - 1, await self.current_epoch()) from None

    async def added_shards(self) -> dict[str, str]:
        """Shards registered by `tenfold shards add`: name -> URL (empty before any)."""
        async with self.pool.acquire() as conn:
            try:
                rows = await conn.fetch("SELECT name, url FROM tenfold_shards")
            except QueryError:
                return {}  # a catalog from before resharding: no such table yet
        return {str(r[0]): str(r[1]) for r in rows}

    async def lease_worker(self, lease_s: float) -> WorkerLease:
        """Claim the lowest id-worker number that no live process holds."""
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        for _ in range(MAX_WORKERS * 2):
            now = time.time()
            async with self.pool.acquire() as conn:
                rows = await conn.fetch("SELECT worker, expires_at FROM tenfold_id_workers")
                held = {int(r[0]): float(r[1]) for r in rows}
                free = [w for w in range(MAX_WORKERS) if held.get(w, 0.0) < now]
                if not free:
                    raise KeyspaceError(
                        f"all {MAX_WORKERS} id-worker numbers are leased by live processes; "
                        "stop idle processes or wait for their leases to lapse"
                    )
                worker = free[0]
                if worker in held:
                    won = await conn.execute(
                        "UPDATE tenfold_id_workers SET owner = $1, expires_at = $2 "
                        "WHERE worker = $3 AND expires_at < $4",
                        owner,
                        now + lease_s,
                        worker,
                        now,
                    )
                else:
                    try:
                        won = await conn.execute(
                            "INSERT INTO tenfold_id_workers (worker, owner, expires_at) "
                            "VALUES ($1, $2, $3)",
                            worker,
                            owner,
                            now + lease_s,
                        )
                    except ConstraintViolation:
                        won = 0
            if won == 1:
                return WorkerLease(worker, owner, now + lease_s)
        raise KeyspaceError("could not lease an id-worker number: too much contention, retry")

    async def renew(self, lease: WorkerLease, lease_s: float) -> bool:
        """Extend `lease`; False if another process took it over (stop issuing ids)."""
        expires = time.time() + lease_s
        async with self.pool.acquire() as conn:
            n = await conn.execute(
                "UPDATE tenfold_id_workers SET expires_at = $1 WHERE worker = $2 AND owner = $3",
                expires,
                lease.worker,
                lease.owner,
            )
        if n == 1:
            lease.expires_at = expires
        return n == 1

    async def release(self, lease: WorkerLease) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM tenfold_id_workers WHERE worker = $1 AND owner = $2",
                lease.worker,
                lease.owner,
            )
        lease.expires_at = 0.0
