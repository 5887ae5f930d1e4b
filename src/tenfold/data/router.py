"""`ShardedDatabase`: route each key to the shard that owns its slot.

    key ─slot_of─▶ slot ─topology (cached, epoch-checked)─▶ shard ─pool─▶ connection

Invariants:
- While the catalog answers, a request uses the topology that was current in
  the catalog at most `topology_ttl_s` ago: the first request after the TTL
  re-reads the epoch (one cheap query, waited for at most
  `topology_refresh_wait_s`) and is routed by the reloaded map.
- The catalog is never on the request path otherwise: requests that arrive
  while a refresh runs, or while the catalog is down, keep the cached map
  (logged); the refresh retries after each TTL. Fencing writes to moving slots
  is the resharding layer's job (the epoch is its hook).
- A shard that cannot be reached fails only the requests routed to it, after
  its bounded connect timeout; pools are per shard and created lazily.
- Every lease of a shard database goes through its `ShardGuard` (data/guard.py):
  a circuit breaker (a dead shard fails in microseconds once it tripped) and a
  bulkhead (a stalled shard holds at most `shard_max_concurrent` requests; the
  rest are refused at once), so a bad shard costs only its own requests.
- `read_for` prefers a healthy replica (round robin); a replica that failed has
  its breaker opened for `replica_retry_s`, and the primary serves when none
  is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar

from tenfold.config import Settings, ShardSpec, load_settings
from tenfold.data import migrations
from tenfold.data.base import Connection, Pool, PoolOptions, Record, pool_from_url
from tenfold.data.catalog import Catalog, WorkerLease
from tenfold.data.guard import Guarded, GuardOptions, ShardGuard
from tenfold.data.scatter import ScatterResult, gather_shards, merge_rows
from tenfold.errors import (
    ConfigError,
    DataError,
    KeyspaceError,
    ShardTimeout,
    ShardUnavailable,
    SlotMoved,
    TenfoldError,
)
from tenfold.ids import IdGenerator, slot_of_id
from tenfold.keyspace import SLOTS, Key, Topology, slot_of
from tenfold.observe import metrics
from tenfold.resilience import Backoff, BreakerState

__all__ = ["ShardHealth", "ShardedDatabase"]

log = logging.getLogger("tenfold.data")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ShardHealth:
    """One shard primary as `health()` saw it.

    `breaker` is its circuit breaker's state ("closed", "open", "half_open"),
    `in_use` the leases it has in flight and `stalled` whether its bulkhead is
    full and freed nothing for `shard_max_wait_s`.
    """

    name: str
    url: str
    reachable: bool
    rtt_ms: float | None
    error: str | None
    breaker: str = "closed"
    in_use: int = 0
    stalled: bool = False


class _Shard:
    """A shard's primary pool, its replica pools, and a guard for each."""

    def __init__(
        self,
        spec: ShardSpec,
        options: PoolOptions,
        guard: GuardOptions,
        replica_retry_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.name = spec.name
        self.primary = pool_from_url(spec.name, spec.url, options)
        self.guard = ShardGuard(spec.name, self.primary.safe_url, guard, clock=clock)
        self.replicas = [
            pool_from_url(f"{spec.name}/replica{i}", url, options)
            for i, url in enumerate(spec.replicas)
        ]
        # A replica that fails once is skipped for replica_retry_s: a breaker
        # tripping on the first fault, with the primary as the fallback.
        replica_guard = GuardOptions(
            max_concurrent=guard.max_concurrent,
            max_wait_s=guard.max_wait_s,
            max_waiting=guard.max_waiting,
            failures=1,
            open_s=replica_retry_s,
            stall_after_s=guard.stall_after_s,
            log_every_s=guard.log_every_s,
        )
        self.replica_guards = [
            ShardGuard(pool.name, pool.safe_url, replica_guard, clock=clock)
            for pool in self.replicas
        ]
        self._next = itertools.cycle(range(len(self.replicas))) if self.replicas else None

    def replica_order(self) -> list[int]:
        """Replica indexes to try, round robin, skipping those whose breaker is open."""
        if self._next is None:
            return []
        start = next(self._next)
        order = [(start + i) % len(self.replicas) for i in range(len(self.replicas))]
        return [i for i in order if self.replica_guards[i].breaker.state is not BreakerState.OPEN]

    def lease(self, slot: int | None) -> Guarded:
        """A guarded primary connection."""
        return Guarded(self.guard, self.primary, slot)

    async def close(self) -> None:
        for pool in (self.primary, *self.replicas):
            await pool.close()


_PRIMARY, _REPLICA, _NAMED = 0, 1, 2


class _Lease:
    """`async with` a connection, tagged with the key's slot.

    The shard is resolved in `__aenter__`, after the topology check, so the
    request that notices a new epoch is already routed by it.
    """

    __slots__ = ("_ctx", "_db", "_mode", "_name", "_slot")

    def __init__(self, db: ShardedDatabase, slot: int | None, mode: int, name: str = "") -> None:
        self._db = db
        self._slot = slot
        self._mode = mode
        self._name = name
        self._ctx: Any = None

    async def __aenter__(self) -> Connection:
        db = self._db
        if db._clock() >= db._topology_deadline:
            await db._check_topology()
        if self._mode == _NAMED:
            shard = db._named(self._name)
        else:
            topology = db._topology or db.topology  # the property raises when not open
            shard = db._shards[topology.shard_of_slot(self._slot)]  # type: ignore[arg-type]
            if self._mode == _REPLICA and shard.replicas:
                self._ctx, replica = await db._pick_replica(shard)
                replica.slot = self._slot
                return replica
        self._ctx = shard.lease(self._slot)
        conn: Connection = await self._ctx.__aenter__()
        return conn

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        result: bool | None = await self._ctx.__aexit__(et, e, tb)
        return result


class ShardedDatabase:
    """Shards, the catalog and the topology, behind one routing API.

    Use it as `async with ShardedDatabase(settings) as db:` (or `open()`/`close()`).

    Args:
        settings: the shard and catalog URLs and pool bounds; `load_settings()` if None.
        clock: monotonic seconds, for the topology TTL; injected by tests.
    """

    def __init__(
        self, settings: Settings | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or load_settings()
        self._clock = clock
        s = self.settings
        self.options = PoolOptions(
            min_size=s.pool_min_size,
            max_size=s.pool_max_size,
            acquire_timeout_s=s.pool_acquire_timeout_s,
            connect_timeout_s=s.connect_timeout_s,
            query_timeout_s=s.query_timeout_s,
            statement_cache_size=s.statement_cache_size,
            reset=s.pool_reset,
        )
        self.guard_options = GuardOptions(
            max_concurrent=s.shard_max_concurrent,
            max_wait_s=s.shard_max_wait_s,
            max_waiting=s.shard_max_waiting,
            failures=s.shard_breaker_failures,
            open_s=s.shard_breaker_open_s,
            stall_after_s=s.shard_stall_after_s,
        )
        self._moved_listeners: list[Callable[[list[int]], None]] = []
        self._shards: dict[str, _Shard] = {}
        for spec in s.shard_specs():
            self._add_shard(spec)
        # The catalog answers one query per TTL per process: a small pool is plenty.
        catalog_options = replace(self.options, min_size=1, max_size=min(4, s.pool_max_size))
        self.catalog = Catalog(pool_from_url("catalog", s.catalog_url, catalog_options))
        self._topology: Topology | None = None
        self._topology_deadline = float("inf")
        self._refreshing: asyncio.Future[bool] | None = None
        self._catalog_ok = True
        self._background: set[asyncio.Future[bool]] = set()
        self._lease: WorkerLease | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._ids: IdGenerator | None = None

    # -- life cycle -------------------------------------------------------

    async def open(self, *, ids: bool = True) -> ShardedDatabase:
        """Prepare the catalog, load (or create) the topology, lease an id worker.

        The first open of an empty catalog stores a balanced topology over the
        configured shards at epoch 1. Shards themselves are not contacted.
        A failed open closes what it opened.
        """
        try:
            await migrations.apply(self.catalog.pool, migrations.builtin("catalog"))
            topology = await self.catalog.load_topology()
            if topology is None:
                # Another process may create it first (StaleEpoch): then load theirs.
                with contextlib.suppress(TenfoldError):
                    await self.catalog.save_topology(Topology.balanced(list(self._shards)))
                topology = await self.catalog.load_topology()
            assert topology is not None
            await self._adopt(topology)
            if ids:
                lease_s = self.settings.id_worker_lease_s
                self._lease = await self.catalog.lease_worker(lease_s)
                self._ids = IdGenerator(self._lease.worker, valid_until=self._lease.valid)
                self._renewer = asyncio.create_task(self._renew_lease(lease_s))
        except BaseException:
            # A failed open (a ConfigError, an unreachable catalog) must not keep
            # the catalog's connections: SQLite's threads would keep the process alive.
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop renewing the id lease, release it, and close every pool."""
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        if self._lease is not None:
            try:
                await self.catalog.release(self._lease)
            except DataError as exc:
                log.warning("could not release id worker %s: %s", self._lease.worker, exc)
            self._lease = None
        for shard in self._shards.values():
            await shard.close()
        await self.catalog.pool.close()

    async def __aenter__(self) -> ShardedDatabase:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- topology ---------------------------------------------------------

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise KeyspaceError("the database is not open: call `await db.open()` first")
        return self._topology

    async def _adopt(self, topology: Topology) -> None:
        """Install `topology`, first opening shards added since start (`tenfold shards add`)."""
        if any(name not in self._shards for name in topology.shards):
            for name, url in (await self.catalog.added_shards()).items():
                if name not in self._shards:
                    self._add_shard(ShardSpec(name=name, url=url))
        self._install(topology)

    def _add_shard(self, spec: ShardSpec) -> None:
        s = self.settings
        shard = _Shard(spec, self.options, self.guard_options, s.replica_retry_s, self._clock)
        shard.guard.on_moved = self._slot_moved
        self._shards[spec.name] = shard

    def _slot_moved(self) -> None:
        """A shard refused a write because its slot moved: re-read the topology
        before the next lease instead of after the TTL (Redis's MOVED)."""
        self._topology_deadline = 0.0

    def on_slots_moved(self, listener: Callable[[list[int]], None]) -> None:
        """Call `listener(slots)` whenever a new topology changes the owner of `slots`.

        The runtime drops cache entries tagged with those slots (`cache.slot_tag`).
        """
        self._moved_listeners.append(listener)

    def _install(self, topology: Topology) -> None:
        missing = [name for name in topology.shards if name not in self._shards]
        if missing:
            raise ConfigError(
                "TENFOLD_SHARDS",
                f"the catalog's topology (epoch {topology.epoch}) routes slots to shard(s) "
                f"{', '.join(missing)} that the settings do not define; add their URLs",
            )
        old, self._topology = self._topology, topology
        self._topology_deadline = self._clock() + self.settings.topology_ttl_s
        if old is not None and self._moved_listeners:
            moved = [s for s in range(SLOTS) if old.shard_of_slot(s) != topology.shard_of_slot(s)]
            for listener in list(self._moved_listeners):
                try:
                    listener(moved)
                except Exception:
                    log.exception("a slots-moved listener failed")

    async def _check_topology(self) -> None:
        """The first request after the TTL: refresh, waiting at most `topology_refresh_wait_s`.

        The deadline moves on at once, so concurrent requests keep routing with
        the cached map instead of queueing behind the catalog. While the last
        refresh failed (catalog down or slow), nobody waits: the refresh runs in
        the background and the cached topology stays in use.
        """
        self._topology_deadline = self._clock() + self.settings.topology_ttl_s
        task = asyncio.ensure_future(self.refresh_topology())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if not self._catalog_ok:
            return
        try:
            async with asyncio.timeout(self.settings.topology_refresh_wait_s):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning("catalog slow: routing with cached topology epoch %s", self.topology.epoch)

    async def refresh_topology(self) -> bool:
        """Re-read the catalog epoch and reload the map if it moved; True if it did.

        Concurrent callers share one catalog round trip. When the catalog is
        unreachable the cached topology stays in use and the check is retried
        after the next TTL.
        """
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        self._refreshing = asyncio.get_running_loop().create_future()
        changed = False
        try:
            epoch = await self.catalog.current_epoch()
            if epoch != self.topology.epoch:
                fresh = await self.catalog.load_topology()
                if fresh is not None and fresh.epoch != self.topology.epoch:
                    log.info("topology epoch %s -> %s", self.topology.epoch, fresh.epoch)
                    await self._adopt(fresh)
                    changed = True
            self._catalog_ok = True
        except DataError as exc:
            self._catalog_ok = False
            log.warning(
                "catalog unreachable, keeping topology epoch %s: %s", self.topology.epoch, exc
            )
        finally:
            self._topology_deadline = self._clock() + self.settings.topology_ttl_s
            future, self._refreshing = self._refreshing, None
            future.set_result(changed)
        return changed

    # -- routing ----------------------------------------------------------

    @property
    def shard_names(self) -> list[str]:
        return list(self._shards)

    def shard_name_for(self, key: Key) -> str:
        """The shard that owns `key` under the cached topology."""
        return self.topology.shard_of(key)

    def shard_for(self, key: Key) -> AbstractAsyncContextManager[Connection]:
        """A primary connection on the shard that owns `key` (`async with`)."""
        return self.shard_for_slot(slot_of(key))

    def shard_for_slot(self, slot: int) -> AbstractAsyncContextManager[Connection]:
        """A primary connection on the shard that owns `slot`."""
        shard = self.topology.shard_of_slot(slot)  # refuses a slot outside 0..4095 now
        if self._clock() < self._topology_deadline:
            # Fast path, the common case: the cached topology is fresh, so the
            # shard's guarded lease is handed out without a `_Lease` around it.
            return self._shards[shard].lease(slot)
        return _Lease(self, slot, _PRIMARY)

    def shard_for_id(self, id_: int) -> AbstractAsyncContextManager[Connection]:
        """A primary connection on the shard that owns the row with this tenfold id."""
        return self.shard_for_slot(slot_of_id(id_))

    def shard(self, name: str) -> _Lease:
        """A primary connection on the shard called `name` (no slot: `insert` refuses)."""
        self._named(name)
        return _Lease(self, None, _NAMED, name)

    def read_for(self, key: Key) -> _Lease:
        """A connection for reads of `key`: a healthy replica if any, else the primary."""
        return _Lease(self, slot_of(key), _REPLICA)

    async def transaction_for(
        self, key: Key, fn: Callable[[Connection], Awaitable[T]], *, transaction: bool = True
    ) -> T:
        """Run `fn(conn)` in a transaction on `key`'s shard; after a move, on its new owner.

        A write refused because the slot moved (`SlotMoved`: nothing was
        written) is run again once the topology names the new owner, for at
        most `slot_moved_wait_s` (a move's write pause is far shorter).
        `transaction=False` runs `fn` without BEGIN/COMMIT, for one statement.
        """
        return await self.transaction_for_slot(slot_of(key), fn, transaction=transaction)

    async def transaction_for_id(
        self, id_: int, fn: Callable[[Connection], Awaitable[T]], *, transaction: bool = True
    ) -> T:
        """`transaction_for` the slot of a tenfold id."""
        return await self.transaction_for_slot(slot_of_id(id_), fn, transaction=transaction)

    async def transaction_for_slot(
        self, slot: int, fn: Callable[[Connection], Awaitable[T]], *, transaction: bool = True
    ) -> T:
        deadline: float | None = None
        backoff: Backoff | None = None
        while True:
            try:
                async with self.shard_for_slot(slot) as conn:
                    if not transaction:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except SlotMoved:
                if deadline is None:
                    deadline = self._clock() + self.settings.slot_moved_wait_s
                    backoff = Backoff(initial_s=0.005, max_s=0.1)
                elif self._clock() > deadline:
                    raise
                assert backoff is not None
                await asyncio.sleep(backoff.next_s())
                await self.refresh_topology()

    async def move_slots(
        self, slots: Sequence[int] | str, to: str, *, until: str = "switched", **options: Any
    ) -> list[Any]:
        """Move `slots` (a list, or ranges like "0-255,1024") to shard `to`, online.

        One workflow per current owner, run concurrently (tenfold.reshard);
        `until` is "switched" (then `complete` or `reverse` later) or "completed".
        Returns the `MoveRecord`s.
        """
        from tenfold.reshard import MoveOptions, Mover

        return await Mover(self, MoveOptions(**options)).move(slots, to, until=until)

    async def add_shard(self, name: str, url: str, folder: Any = None) -> Topology:
        """Register a new, empty, migrated shard (`tenfold.reshard.shards.add_shard`)."""
        from tenfold.reshard.shards import add_shard

        return await add_shard(self, name, url, folder)

    async def _forget_shard(self, name: str) -> None:
        shard = self._shards.pop(name, None)
        if shard is not None:
            await shard.close()

    async def _pick_replica(self, shard: _Shard) -> tuple[Any, Connection]:
        for index in shard.replica_order():
            try:
                return await _enter(
                    Guarded(shard.replica_guards[index], shard.replicas[index], None)
                )
            except (ShardUnavailable, ShardTimeout) as exc:
                # Its breaker opened (failures=1): skipped for replica_retry_s.
                log.warning(
                    "replica unavailable, skipping it for %ss: %s",
                    self.settings.replica_retry_s,
                    exc,
                )
        return await _enter(shard.lease(None))

    def _named(self, name: str) -> _Shard:
        try:
            return self._shards[name]
        except KeyError:
            raise KeyspaceError(
                f"no shard named {name!r}; shards: {', '.join(self._shards)}"
            ) from None

    def pool(self, name: str) -> Pool:
        """The primary pool of shard `name` (for tools and stats)."""
        return self._named(name).primary

    # -- ids ----------------------------------------------------------------

    def new_id(self, key: Key) -> int:
        """A new 64-bit, time-ordered id in `key`'s slot (see `tenfold.ids`)."""
        return self._id_generator().next_id(key)

    def new_id_beside(self, id_: int) -> int:
        """A new id in the slot of the tenfold id `id_`: for a row that lives with
        its parent, such as a room's messages, so both route to the same shard.
        (`new_id(id_)` would hash the number as a key and land in another slot.)"""
        return self._id_generator().next_id_for_slot(slot_of_id(id_))

    def _id_generator(self) -> IdGenerator:
        if self._ids is None:
            raise KeyspaceError("ids need a leased worker: open the database with ids=True")
        return self._ids

    async def _renew_lease(self, lease_s: float) -> None:
        """Renew the id-worker lease every third of its length, until closed.

        A failed renewal is tried again sooner, after the house backoff
        (`tenfold.resilience.Backoff`: capped at a sixth of the lease and
        jittered, so processes that lost the catalog together do not return in
        step), instead of a whole third later, which let two failures in a row
        lapse the lease.
        """
        backoff = Backoff(initial_s=min(0.1, lease_s / 60), max_s=lease_s / 6)
        delay = lease_s / 3
        while self._lease is not None:
            await asyncio.sleep(delay)
            try:
                renewed = await self.catalog.renew(self._lease, lease_s)
            except DataError as exc:
                delay = backoff.next_s()
                log.warning("id worker lease renewal failed, retrying in %.2f s: %s", delay, exc)
                continue
            backoff.reset()
            delay = lease_s / 3
            if not renewed:
                log.error("id worker %s was taken over; ids stop", self._lease.worker)
                return

    # -- many shards ------------------------------------------------------

    async def scatter(
        self,
        sql: str,
        *args: Any,
        timeout_s: float | None = None,
        partial: bool = False,
        order_by: str | Sequence[str] | Callable[[Record], Any] | None = None,
        descending: bool = False,
        limit: int | None = None,
        shards: Sequence[str] | None = None,
    ) -> ScatterResult:
        """Run `sql` on every shard (or `shards`) at once and gather the rows.

        Args:
            timeout_s: bound per shard (default `scatter_timeout_s`).
            partial: return the other shards' rows when some fail (listed in
                `result.failed`) instead of raising `ScatterError`.
            order_by, descending, limit: how `result.rows` is merged; push the
                same ORDER BY / LIMIT into `sql` so each shard sends little.
        """
        names = list(shards) if shards is not None else self.topology.shards
        for name in names:
            self._named(name)

        async def run(name: str) -> list[Record]:
            async with self.shard(name) as conn:
                return await conn.fetch(sql, *args)

        by_shard, failed = await gather_shards(
            names, run, timeout_s=timeout_s or self.settings.scatter_timeout_s, partial=partial
        )
        rows = merge_rows(by_shard, order_by, descending=descending, limit=limit)
        return ScatterResult(by_shard=by_shard, failed=failed, rows=rows)

    async def health(self) -> list[ShardHealth]:
        """Ping every shard primary concurrently; never raises for a dead shard."""

        async def one(name: str) -> ShardHealth:
            shard = self._shards[name]
            pool = shard.primary
            # The ping goes to the pool, not through the guard: a health probe
            # must neither wait in a stalled shard's bulkhead nor move its breaker.
            guard = shard.guard.state()
            extra = (guard["breaker"], guard["in_use"], guard["stalled"])
            try:
                rtt = await pool.ping()
            except TenfoldError as exc:
                metrics.shard_up.labels(name).set(0)
                return ShardHealth(name, pool.safe_url, False, None, str(exc), *extra)
            metrics.shard_up.labels(name).set(1)
            return ShardHealth(name, pool.safe_url, True, rtt, None, *extra)

        return list(await asyncio.gather(*(one(n) for n in self._shards)))

    async def migrate(self, folder: Any = None, *, create: bool = True) -> dict[str, list[str]]:
        """Apply tenfold's and the app's migrations to the catalog and every shard.

        Returns the names applied per database ("catalog" and each shard).
        """
        from tenfold.data.schema import migrate_all

        return await migrate_all(self, folder, create=create)

    def all_pools(self) -> list[Pool]:
        return [self.catalog.pool, *(s.primary for s in self._shards.values())]


async def _enter(ctx: Guarded) -> tuple[Any, Connection]:
    conn = await ctx.__aenter__()
    return ctx, conn
