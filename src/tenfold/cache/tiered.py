"""TieredCache: L1 (in process) → L2 (shared) → loader, with single-flight and fail-safe.

Flow of one `get_or_load(key, loader)`::

    L1 ─hit─▶ L2 ─hit (copied to L1)─▶ entry?
      fresh (now < fresh_until)              ─▶ value (and, with probability rising as
                                                fresh_until nears, one background refresh)
      stale (now < stale_until)              ─▶ value, and one background refresh
      expired but held (now < hold_until)    ─▶ join/start the load; if it raises or
                                                runs past soft_timeout_s ─▶ old value
      none                                   ─▶ join/start the load ─▶ its value or error

An entry is one orjson envelope
`[fresh_until, stale_until, hold_until, value, tags, load_s]` stored as the same
bytes in L1 and L2 (5-field envelopes written before `load_s` existed still
decode, with load_s = 0). Times are wall-clock seconds (`clock`), because
processes share them via L2; `hold_until = fresh_until + max(stale_ttl_s,
fail_safe_max_s)` is the L2 TTL. L1 also keeps the envelope decoded once
(`_Meta`), so an L1 hit reads the times without parsing; the caller still gets a
private copy of a mutable value (a list or dict is copied by a copier planned
once, see copying.py; str, int, float, bool and None are immutable and returned
as they are). The reader of an L2 hit gets the object just decoded from the
reply, which nobody else holds; the copier is planned on the entry's next read.

Probabilistic early refresh (XFetch, Vattani, Chierichetti and Lowenstein,
"Optimal Probabilistic Cache Stampede Prevention", VLDB 2015): on a fresh hit,
one background refresh starts when
`now - load_s * beta * ln(random()) >= fresh_until`, where `load_s` is how long
the value's load took (stored in the envelope) and `beta` is
`early_refresh_beta` (0 disables). The refresh is an ordinary single-flight load,
so many callers triggering it at once start one loader call per process.

Cluster-wide single-flight (`cluster_lock=True`): the load first tries
`try_lock(<prefix>:l:<key>, token, lock_ttl_s)` in L2. The winner runs the loader,
stores the value and releases the lock by compare-and-delete. A loser polls L2
(2 ms doubling to 50 ms, with jitter) for a value newer than the one it had,
retrying the lock on each poll (so when a holder dies, the first poller to see
its lease expire takes over), and after `lock_ttl_s` of waiting loads by itself.
An unknown answer (L2 down or slow) loads locally: the lock never turns an L2
outage into an error. A loader slower than `lock_ttl_s` loses its lease and
may be joined by another process's load.

Invariants:
- At most one loader call per key is in flight in a process (`_flights`).
- A load that overlapped an invalidation of its key (or of any tag, or a
  resync) returns its value to its callers but writes neither L1 nor L2
  (`_dirty`), so an invalidation is never undone by an older load.
- Nothing that fails to serialise, or whose envelope exceeds `max_value_bytes`,
  is stored anywhere: the caller gets `CacheError`.

Invalidation propagation bound: `invalidate`, `invalidate_tag`, `set` and `warm`
delete (or overwrite) L2 and then publish on `<prefix>:inv`; every process's
subscriber drops the L1 entries named. While the pub/sub link is up a peer's
L1 is clean one Redis hop after the call returns (about a millisecond on
localhost; the cross-process test allows 0.5 s). While it is down, an L1
entry lives at most `l1_max_ttl_s`, and each process clears its whole L1 when
its subscriber reconnects. An invalidation issued while Redis itself is
unreachable cannot delete the L2 entry: peers may read it until its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tenfold.cache.base import L2Backend
from tenfold.cache.copying import Copier, copier_for
from tenfold.cache.l1 import L1Cache
from tenfold.errors import CacheError, ConfigError
from tenfold.observe import metrics

__all__ = ["Loader", "TieredCache", "WarmReport"]

log = logging.getLogger("tenfold.cache")

Loader = Callable[[], Awaitable[Any]]
_MAX_MESSAGE_KEYS = 1000  # a bigger batch is published as "drop everything"
_WARM_BATCH = 256  # entries per L2 pipeline when warming
_POLL_FIRST_S = 0.002  # lock waiters: first poll delay, doubled up to _POLL_MAX_S
_POLL_MAX_S = 0.05
_IMMUTABLE = (str, int, float, bool)
_NUMBER = (int, float)  # JSON numbers as orjson decodes them (bool is neither)
_XFETCH_REACH = 37.0  # > -ln(2**-53): the largest -ln(r) for a nonzero random() double
_L2_OPS = ("get", "get_many", "set", "set_many", "delete", "delete_tag", "publish", "lock")


@dataclass(frozen=True, slots=True)
class _Policy:
    ttl_s: float
    stale_ttl_s: float
    fail_safe_max_s: float
    negative_ttl_s: float
    soft_timeout_s: float | None
    tags: tuple[str, ...]


@dataclass(slots=True)
class _Meta:
    """An envelope decoded once: its times, the value, and how to copy it if mutable."""

    fresh: float
    stale: float
    hold: float
    load_s: float
    value: Any  # the cache's own object: returned as is when `copier` is None (immutable)
    size: int  # bytes of the value's JSON (sizes the L1 entry), 0 when immutable
    copier: Copier | None  # makes each caller's private copy (see copying.py), or a state below
    tags: tuple[str, ...]
    early_at: float = math.inf  # before it, early refresh cannot fire (set by _l1_put)
    l1_fresh: float = -math.inf  # min(fresh, the L1 entry's expiry) in `clock` time
    raw: bytes | None = None  # the envelope `value` was decoded from (lazy states only)

    def private(self) -> Any:
        """A value no other caller holds (see `_HAND_OVER` and `_REDECODE`)."""
        copier = self.copier
        if copier is None:
            return self.value
        if copier is _HAND_OVER:
            self.copier = _REDECODE
            value, self.value = self.value, None
            return value
        if copier is _REDECODE:
            assert self.raw is not None
            self.value = orjson.loads(self.raw)[3]
            copier = self.copier = copier_for(self.value)
            self.raw = None
        return copier(self.value)


# Lazy states of `_Meta.copier`, for a value just decoded from an L2 reply. Planning
# its copier (copying.py) costs ~5 µs for a 200-byte dict, four times the decode, and
# the entry may never be read again (an L1 smaller than the working set evicts it
# first). So the first reader takes the decoded object itself, which nobody else
# holds (_HAND_OVER), and a second reader decodes the envelope again for the cache
# and plans its copier (_REDECODE). Only `private()` may read `value` in these
# states; the functions are markers compared by identity, never called.
def slot_tag(slot: int) -> str:
    """The tag for cache entries read from rows of `slot`.

    Tag entries with it (`tags=[slot_tag(slot_of_id(room_id))]`) and a reshard
    that moves the slot drops them on every process (`Runtime` wires
    `ShardedDatabase.on_slots_moved` to `invalidate_slots`).
    """
    return f"tenfold.slot.{slot}"


def _HAND_OVER(value: Any) -> Any:
    raise AssertionError("a lazy copier state is read through _Meta.private()")


def _REDECODE(value: Any) -> Any:
    raise AssertionError("a lazy copier state is read through _Meta.private()")


def _meta_of(
    fresh: float, stale: float, hold: float, load_s: float, value: Any, tags: tuple[str, ...]
) -> _Meta:
    """The meta of `value`, which came from a loader: a copy is kept, since the
    loader's caller may mutate its object later."""
    if value is None or type(value) in _IMMUTABLE:
        return _Meta(fresh, stale, hold, load_s, value, 0, None, tags)
    encoded = orjson.dumps(value)
    value = orjson.loads(encoded)
    return _Meta(fresh, stale, hold, load_s, value, len(encoded), copier_for(value, encoded), tags)


@dataclass(slots=True)
class WarmReport:
    """What `warm` / `warm_keys` did: keys stored, keys skipped, and the failures by key."""

    stored: int = 0
    skipped: int = 0
    failed: dict[str, BaseException] = field(default_factory=dict)


class TieredCache:
    """A two-level cache with single-flight loads, stale-while-revalidate and fail-safe.

    Args:
        l1: the in-process cache.
        l2: the shared cache (`memory://` or Redis); `close()` closes it.
        prefix: namespace of every key, tag, lock and the invalidation channel;
            also the `cache` label of the metrics.
        clock: wall-clock seconds shared by every process (`time.time`).
        ttl_s: default freshness of a loaded or set value.
        stale_ttl_s: default time after expiry during which the stale value is
            served while one background load refreshes it.
        fail_safe_max_s: default time after expiry during which the old value
            is served if the loader raises or is slower than `soft_timeout_s`.
        soft_timeout_s: how long a caller holding an old value waits for the
            loader before serving the old value (None: wait for the loader).
        hard_timeout_s: bound on one loader call; beyond it the load fails.
        negative_ttl_s: how long a `None` result is cached (0: never).
        l1_max_ttl_s: bound on an L1 entry's life, hence on staleness when
            invalidation messages are lost.
        max_value_bytes: bound on one serialised entry.
        max_key_bytes: bound on a key or tag (UTF-8).
        early_refresh_beta: XFetch's beta; larger refreshes earlier (0: off).
        random: uniform [0, 1) source for early refresh and lock-poll jitter (like
            `random.random`: a nonzero draw below 2**-53 is treated as 2**-53).
        cluster_lock: take an L2 lock per key so one process in the cluster
            loads a missing key while the others poll L2 for its value.
        lock_ttl_s: lease of that lock, and bound on how long a process waits
            for another's load before loading by itself.
    """

    def __init__(
        self,
        l1: L1Cache,
        l2: L2Backend,
        *,
        prefix: str,
        clock: Callable[[], float] = time.time,
        ttl_s: float = 60.0,
        stale_ttl_s: float = 0.0,
        fail_safe_max_s: float = 0.0,
        soft_timeout_s: float | None = None,
        hard_timeout_s: float = 30.0,
        negative_ttl_s: float = 5.0,
        l1_max_ttl_s: float = 60.0,
        max_value_bytes: int = 1024 * 1024,
        max_key_bytes: int = 512,
        early_refresh_beta: float = 1.0,
        random: Callable[[], float] = random.random,
        cluster_lock: bool = False,
        lock_ttl_s: float = 5.0,
    ) -> None:
        if not prefix or not isinstance(prefix, str):
            raise ConfigError("cache prefix", f"must be a non-empty string, got {prefix!r}")
        checks: list[tuple[str, float | None, bool]] = [
            ("ttl_s", ttl_s, ttl_s > 0),
            ("stale_ttl_s", stale_ttl_s, stale_ttl_s >= 0),
            ("fail_safe_max_s", fail_safe_max_s, fail_safe_max_s >= 0),
            ("soft_timeout_s", soft_timeout_s, soft_timeout_s is None or soft_timeout_s > 0),
            ("hard_timeout_s", hard_timeout_s, hard_timeout_s > 0),
            ("negative_ttl_s", negative_ttl_s, negative_ttl_s >= 0),
            ("l1_max_ttl_s", l1_max_ttl_s, l1_max_ttl_s > 0),
            ("max_value_bytes", max_value_bytes, max_value_bytes > 0),
            ("max_key_bytes", max_key_bytes, max_key_bytes > 0),
            ("early_refresh_beta", early_refresh_beta, 0 <= early_refresh_beta < math.inf),
            ("lock_ttl_s", lock_ttl_s, 0 < lock_ttl_s < math.inf),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ConfigError(f"cache {prefix} {name}", f"out of range: {value!r}")
        self.l1 = l1
        self._l1_entries = l1._entries  # read directly on the hot path (see get_or_load)
        self.l2 = l2
        self.prefix = prefix
        self.channel = f"{prefix}:inv"
        self.clock = clock
        self.hard_timeout_s = hard_timeout_s
        self.l1_max_ttl_s = l1_max_ttl_s
        self.max_value_bytes = max_value_bytes
        self.max_key_bytes = max_key_bytes
        self.early_refresh_beta = early_refresh_beta
        self.random = random
        self.cluster_lock = cluster_lock
        self.lock_ttl_s = lock_ttl_s
        self._key_prefix = f"{prefix}:k:"
        self._defaults = _Policy(
            ttl_s, stale_ttl_s, fail_safe_max_s, negative_ttl_s, soft_timeout_s, ()
        )
        self._origin = uuid.uuid4().hex  # our own messages are skipped on receipt
        self._flights: dict[str, asyncio.Task[_Meta | None]] = {}
        self._dirty: set[str] = set()  # in-flight keys invalidated since their load began
        self._start: asyncio.Task[None] | None = None
        self._started = False
        # metric children bound once: a hit costs one inc(), never a labels() lookup
        self._hit_l1 = metrics.cache_hits.labels(prefix, "l1")
        self._hit_l2 = metrics.cache_hits.labels(prefix, "l2")
        self._hit_stale = metrics.cache_hits.labels(prefix, "stale")
        self._hit_fail_safe = metrics.cache_hits.labels(prefix, "fail_safe")
        self._miss_l1 = metrics.cache_misses.labels(prefix, "l1")
        self._miss_l2 = metrics.cache_misses.labels(prefix, "l2")
        self._refresh_early = metrics.cache_refreshes.labels(prefix, "early")
        self._refresh_stale = metrics.cache_refreshes.labels(prefix, "stale")
        self._loader_seconds = metrics.cache_loader_seconds.labels(prefix)
        self._l2_seconds = {op: metrics.cache_l2_seconds.labels(prefix, op) for op in _L2_OPS}
        self._l2_get_seconds = self._l2_seconds["get"]
        self._invalidations = {
            kind: metrics.cache_invalidations.labels(prefix, kind)
            for kind in ("key", "tag", "received", "resync")
        }
        self._lock_outcomes = {
            outcome: metrics.cache_lock.labels(prefix, outcome)
            for outcome in ("won", "lost", "unknown", "peer_value", "took_over", "expired")
        }

    async def start(self) -> None:
        """Subscribe to the invalidation channel (also done on first use); idempotent."""
        if self._start is None:
            self._start = asyncio.get_running_loop().create_task(
                self.l2.subscribe(self.channel, self._on_message)
            )
        await asyncio.shield(self._start)
        self._started = True

    async def close(self) -> None:
        """Cancel in-flight loads and close the L2."""
        if self._start is not None and not self._start.done():
            self._start.cancel()
        for task in list(self._flights.values()):
            task.cancel()
        for task in list(self._flights.values()):
            with contextlib.suppress(BaseException):
                await task
        await self.l2.close()

    async def get_or_load(
        self,
        key: str,
        loader: Loader,
        *,
        ttl_s: float | None = None,
        stale_ttl_s: float | None = None,
        fail_safe_max_s: float | None = None,
        negative_ttl_s: float | None = None,
        soft_timeout_s: float | None = None,
        tags: Sequence[str] = (),
    ) -> Any:
        """The cached value of `key`, calling `loader()` (once per process) when needed.

        Args:
            key: the cache key (a string, at most `max_key_bytes` in UTF-8).
            loader: an async callable returning a JSON-serialisable value or None.
            ttl_s, stale_ttl_s, fail_safe_max_s, negative_ttl_s, soft_timeout_s:
                per-call overrides of the constructor's defaults.
            tags: tags recorded with a loaded value, for `invalidate_tag`.

        Returns:
            A private copy of the value (JSON round trip: tuples come back as lists).

        Raises:
            CacheError: the key or the loaded value cannot be serialised or is too large.
            Exception: whatever the loader raised, when no old value may be served.
        """
        if type(key) is str and key.isascii() and 0 < len(key) <= self.max_key_bytes:
            full = self._key_prefix + key  # inlined _full_key: the hot path
        else:
            full = self._full_key(key)
        if not self._started:
            await self.start()
        # The hot path, a fresh L1 hit, reads the L1's dict itself: `l1_fresh` (set
        # by _l1_put) is already the earlier of "fresh" and the L1 entry's expiry,
        # so one clock read answers both (the benchmark against cashews wants it).
        fast = self._l1_entries.get(full)
        if fast is not None and type(fast.meta) is _Meta:
            now = self.clock()
            hot = fast.meta
            if now < hot.l1_fresh:
                self._l1_entries.move_to_end(full)
                self._hit_l1.value += 1
                if now >= hot.early_at:  # XFetch can fire from here on (see _l1_put)
                    self._maybe_refresh_early(
                        full, key, loader, hot, now,
                        self._policy(ttl_s, stale_ttl_s, fail_safe_max_s,
                                     negative_ttl_s, soft_timeout_s, tags),
                    )  # fmt: skip
                return hot.value if hot.copier is None else hot.private()
        entry = None if fast is None else self.l1.entry(full)  # absent: no second lookup
        meta: _Meta | None = None
        if entry is not None:
            meta = entry.meta if type(entry.meta) is _Meta else self._decode(entry.payload)
            if meta is not None:
                now = self.clock()
                if now < meta.fresh:  # a fresh L1 hit the fast path could not vouch for
                    self._hit_l1.value += 1
                    if now >= meta.early_at:  # XFetch can fire from here on (see _l1_put)
                        self._maybe_refresh_early(
                            full, key, loader, meta, now,
                            self._policy(ttl_s, stale_ttl_s, fail_safe_max_s,
                                         negative_ttl_s, soft_timeout_s, tags),
                        )  # fmt: skip
                    return meta.value if meta.copier is None else meta.private()
        policy = self._policy(
            ttl_s, stale_ttl_s, fail_safe_max_s, negative_ttl_s, soft_timeout_s, tags
        )
        now = self.clock()
        hit = self._hit_l1
        if meta is None:
            self._miss_l1.inc()
            flight = self._flights.get(full)
            if flight is not None:  # a load is under way: join it, do not ask L2 as well
                landed = await asyncio.shield(flight)
                return None if landed is None else landed.private()
            started = time.perf_counter()  # inlined _l2_get: one coroutine less per L2 read
            try:
                raw = await self.l2.get(full)
            finally:
                self._l2_get_seconds.observe(time.perf_counter() - started)
            meta = self._decode(raw)
            hit = self._hit_l2
            if meta is None or now >= meta.hold:
                self._miss_l2.inc()
                # a load may have landed while L2 answered: it wrote L1 first
                entry = self.l1.entry(full)
                meta = None if entry is None else self._decode_entry(entry.meta, entry.payload)
                hit = self._hit_l1
            else:
                assert raw is not None
                # a load may have landed in L1 while L2 answered: never replace it with older
                entry = self.l1.entry(full)
                held = None if entry is None else self._decode_entry(entry.meta, entry.payload)
                if held is not None and held.fresh >= meta.fresh:
                    meta = held
                else:
                    self._l1_put(full, raw, meta)
        if meta is not None:
            if now < meta.fresh:
                hit.inc()
                self._maybe_refresh_early(full, key, loader, meta, now, policy)
                return meta.private()
            if now < meta.stale:
                self._hit_stale.inc()
                if full not in self._flights:
                    self._refresh_stale.inc()
                self._flight(full, key, loader, policy, meta.fresh)
                return meta.private()
        flight = self._flight(full, key, loader, policy, -math.inf if meta is None else meta.fresh)
        if meta is None or now >= meta.hold:
            landed = await asyncio.shield(flight)
        else:
            try:
                async with asyncio.timeout(policy.soft_timeout_s):
                    landed = await asyncio.shield(flight)
            except CacheError:
                raise
            except Exception as exc:  # the loader failed or is slow: serve the old value
                log.debug("cache %s: serving the old value of %r (%r)", self.prefix, key, exc)
                self._hit_fail_safe.inc()
                return meta.private()
        return None if landed is None else landed.private()

    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl_s: float | None = None,
        stale_ttl_s: float | None = None,
        fail_safe_max_s: float | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        """Store `value` in L1 and L2 and tell other processes to drop their L1 copy.

        Raises:
            CacheError: the key or value cannot be serialised or is too large.
        """
        full = self._full_key(key)
        policy = self._policy(ttl_s, stale_ttl_s, fail_safe_max_s, None, None, tags)
        payload, hold_s, meta = self._encode(key, value, policy, 0.0)
        if full in self._flights:
            self._dirty.add(full)
        await self._store(full, payload, hold_s, meta)
        await self._publish(keys=[full])

    async def invalidate(self, key: str) -> None:
        """Drop `key` from this L1 and from L2, then from every process's L1."""
        full = self._full_key(key)
        self._invalidations["key"].inc()
        self._drop_keys([full])
        await self._timed("delete", self.l2.delete(full))
        await self._publish(keys=[full])

    async def invalidate_tag(self, tag: str) -> None:
        """Drop every entry stored with `tag`, here, in L2 and in every process's L1."""
        full_tag = self._full_tag(tag)
        self._invalidations["tag"].inc()
        self._drop_tags([full_tag])
        await self._timed("delete_tag", self.l2.delete_tag(full_tag))
        await self._publish(tags=[full_tag])

    async def invalidate_slots(self, slots: Sequence[int]) -> None:
        """Drop every entry tagged with `slot_tag(s)` for `s` in `slots` (a reshard moved them)."""
        if not slots:
            return
        tags = [self._full_tag(slot_tag(s)) for s in slots]
        self._invalidations["tag"].inc(len(tags))
        self._drop_tags(tags)
        for tag in tags:
            await self._timed("delete_tag", self.l2.delete_tag(tag))
        await self._publish(tags=tags)

    # -- warming ------------------------------------------------------------------

    async def warm(
        self,
        items: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        ttl_s: float | None = None,
        stale_ttl_s: float | None = None,
        fail_safe_max_s: float | None = None,
        tags: Sequence[str] = (),
        only_missing: bool = False,
    ) -> WarmReport:
        """Store known values: L1 and L2 (pipelined, `_WARM_BATCH` per round trip), then
        tell other processes to drop their L1 copies, as `set` does for one key.

        A key or value that cannot be cached fails only that key (`CacheError` in
        `report.failed`); `None` with `negative_ttl_s == 0` is skipped, and so are
        keys already fresh in L2 when `only_missing` is set.
        """
        report = WarmReport()
        policy = self._policy(ttl_s, stale_ttl_s, fail_safe_max_s, None, None, tags)
        pairs = items.items() if isinstance(items, Mapping) else items
        batch: list[tuple[str, str, bytes, float, _Meta]] = []
        for key, value in pairs:
            try:
                full = self._full_key(key)
                payload, hold_s, meta = self._encode(key, value, policy, 0.0)
            except CacheError as exc:
                report.failed[str(key)] = exc
                continue
            if hold_s <= 0:
                report.skipped += 1
                continue
            batch.append((key, full, payload, hold_s, meta))
            if len(batch) >= _WARM_BATCH:
                await self._warm_batch(batch, only_missing, report)
                batch = []
        if batch:
            await self._warm_batch(batch, only_missing, report)
        return report

    async def warm_keys(
        self,
        keys: Iterable[str],
        loader_for_key: Callable[[str], Awaitable[Any]],
        *,
        concurrency: int = 16,
        ttl_s: float | None = None,
        stale_ttl_s: float | None = None,
        fail_safe_max_s: float | None = None,
        negative_ttl_s: float | None = None,
        tags: Sequence[str] = (),
    ) -> WarmReport:
        """Load every key that holds no fresh entry, `concurrency` loader calls at a time.

        Keys already fresh (in L1 or L2) are skipped; so are keys whose loader
        returned None when negative caching is off. A loader that raises, or a
        value that cannot be cached (`CacheError`), fails only its key. Loads go
        through the same single-flight (and cluster lock) as `get_or_load`.
        """
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"cache {self.prefix} warm_keys concurrency", f"{concurrency!r}")
        report = WarmReport()
        policy = self._policy(ttl_s, stale_ttl_s, fail_safe_max_s, negative_ttl_s, None, tags)
        wanted: dict[str, str] = {}
        for key in keys:
            try:
                wanted.setdefault(self._full_key(key), key)
            except CacheError as exc:
                report.failed[str(key)] = exc
        if not self._started:
            await self.start()
        now = self.clock()
        todo: list[tuple[str, str]] = []
        unknown = []
        for full, key in wanted.items():
            entry = self.l1.entry(full)
            meta = None if entry is None else self._decode_entry(entry.meta, entry.payload)
            if meta is not None and now < meta.fresh:
                report.skipped += 1
            else:
                unknown.append((full, key))
        for i in range(0, len(unknown), _WARM_BATCH):
            chunk = unknown[i : i + _WARM_BATCH]
            raws = await self._timed("get_many", self.l2.get_many([full for full, _ in chunk]))
            for (full, key), raw in zip(chunk, raws, strict=True):
                meta = self._decode(raw)
                if meta is not None and now < meta.fresh:
                    report.skipped += 1
                else:
                    todo.append((full, key))
        pending = iter(todo)

        async def worker() -> None:
            for full, key in pending:
                flight = self._flight(
                    full, key, functools.partial(loader_for_key, key), policy, -math.inf
                )
                try:
                    landed = await asyncio.shield(flight)
                except Exception as exc:
                    report.failed[key] = exc
                    continue
                if landed is None or now >= landed.hold:
                    report.skipped += 1
                else:
                    report.stored += 1

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(todo)))))
        return report

    async def _warm_batch(
        self,
        batch: list[tuple[str, str, bytes, float, _Meta]],
        only_missing: bool,
        report: WarmReport,
    ) -> None:
        if only_missing:
            raws = await self._timed("get_many", self.l2.get_many([b[1] for b in batch]))
            now = self.clock()
            kept = []
            for item, raw in zip(batch, raws, strict=True):
                meta = self._decode(raw)
                if meta is not None and now < meta.fresh:
                    report.skipped += 1
                else:
                    kept.append(item)
            batch = kept
        if not batch:
            return
        now = self.clock()
        for _key, full, payload, _hold_s, meta in batch:
            if full in self._flights:
                self._dirty.add(full)
            self._l1_put(full, payload, meta)
        await self._timed(
            "set_many",
            self.l2.set_many(
                [(full, payload, hold_s, meta.tags) for _, full, payload, hold_s, meta in batch]
            ),
        )
        await self._publish(keys=[b[1] for b in batch])
        report.stored += len(batch)

    # -- loading ------------------------------------------------------------------

    def _maybe_refresh_early(
        self, full: str, key: str, loader: Loader, meta: _Meta, now: float, policy: _Policy
    ) -> None:
        """XFetch: start a background refresh with probability rising as `meta.fresh` nears."""
        beta = self.early_refresh_beta
        if not beta or meta.load_s <= 0.0 or full in self._flights:
            return
        r = self.random()
        if r <= 0.0 or now - meta.load_s * beta * math.log(r) >= meta.fresh:
            self._refresh_early.inc()
            self._flight(full, key, loader, policy, meta.fresh)

    def _flight(
        self, full: str, key: str, loader: Loader, policy: _Policy, known: float
    ) -> asyncio.Task[_Meta | None]:
        flight = self._flights.get(full)
        if flight is None:
            self._dirty.discard(full)
            flight = asyncio.get_running_loop().create_task(
                self._load(full, key, loader, policy, known)
            )
            self._flights[full] = flight
            flight.add_done_callback(functools.partial(self._landed, full))
        return flight

    def _landed(self, full: str, task: asyncio.Task[_Meta | None]) -> None:
        if self._flights.get(full) is task:
            del self._flights[full]
            self._dirty.discard(full)
        if not task.cancelled() and task.exception() is not None:  # marks it retrieved
            log.info("cache %s: loader for %r failed: %r", self.prefix, full, task.exception())

    async def _load(
        self, full: str, key: str, loader: Loader, policy: _Policy, known: float
    ) -> _Meta | None:
        """One load of `key`; `known` is the fresh_until of the value it replaces."""
        token: str | None = None
        lock_key = f"{self.prefix}:l:{key}"
        if self.cluster_lock:
            token = uuid.uuid4().hex
            won = await self._try_lock(lock_key, token)
            waited = won is False
            if waited:
                peer, won = await self._wait_for_peer(full, lock_key, token, known)
                if peer is not None:
                    return peer
            if not won:
                token = None  # L2 unreachable, or waited lock_ttl_s: load without the lock
            else:  # a holder may have stored and released between our last L2 read and now
                peer = self._peer_value(full, await self._l2_get(full), known)
                if peer is not None:
                    await self._timed("lock", self.l2.unlock(lock_key, token))
                    return peer
                if waited:
                    self._lock_outcomes["took_over"].inc()
        try:
            return await self._run_loader(full, key, loader, policy)
        finally:
            if token is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.lock_ttl_s):
                        await self._timed("lock", self.l2.unlock(lock_key, token))

    async def _run_loader(
        self, full: str, key: str, loader: Loader, policy: _Policy
    ) -> _Meta | None:
        started = time.perf_counter()
        began = self.clock()
        try:
            async with asyncio.timeout(self.hard_timeout_s):
                value = await loader()
        finally:
            self._loader_seconds.observe(time.perf_counter() - started)
        if value is None and policy.negative_ttl_s <= 0:
            return None
        payload, hold_s, meta = self._encode(key, value, policy, max(0.0, self.clock() - began))
        if full not in self._dirty:  # no invalidation raced with this load
            await self._store(full, payload, hold_s, meta)
        return meta

    async def _try_lock(self, lock_key: str, token: str) -> bool | None:
        won: bool | None = await self._timed(
            "lock", self.l2.try_lock(lock_key, token, self.lock_ttl_s)
        )
        self._lock_outcomes["won" if won else "lost" if won is False else "unknown"].inc()
        return won

    async def _wait_for_peer(
        self, full: str, lock_key: str, token: str, known: float
    ) -> tuple[_Meta | None, bool]:
        """Poll L2 for the lock holder's value: (value, False), or (None, got the lock?)."""
        deadline = time.monotonic() + self.lock_ttl_s
        delay = _POLL_FIRST_S
        while True:
            await asyncio.sleep(min(delay * (0.5 + self.random()), deadline - time.monotonic()))
            peer = self._peer_value(full, await self._l2_get(full), known)
            if peer is not None:
                return peer, False
            if time.monotonic() >= deadline:
                self._lock_outcomes["expired"].inc()
                return None, False
            won = await self._timed("lock", self.l2.try_lock(lock_key, token, self.lock_ttl_s))
            if won is not False:  # the holder's lease ended (or L2 is down): load here
                return None, bool(won)
            delay = min(delay * 2, _POLL_MAX_S)

    def _peer_value(self, full: str, raw: bytes | None, known: float) -> _Meta | None:
        """The entry in `raw` if another load wrote it (newer than `known`, not expired)."""
        meta = self._decode(raw)
        now = self.clock()
        if raw is None or meta is None or meta.fresh <= known or now >= meta.hold:
            return None
        self._lock_outcomes["peer_value"].inc()
        if full not in self._dirty:
            self._l1_put(full, raw, meta)
        return meta

    # -- encoding and storage -----------------------------------------------------

    def _policy(
        self,
        ttl_s: float | None,
        stale_ttl_s: float | None,
        fail_safe_max_s: float | None,
        negative_ttl_s: float | None,
        soft_timeout_s: float | None,
        tags: Sequence[str],
    ) -> _Policy:
        d = self._defaults
        if (
            not tags
            and ttl_s is None
            and stale_ttl_s is None
            and fail_safe_max_s is None
            and negative_ttl_s is None
            and soft_timeout_s is None
        ):
            return d  # the common call: no allocation
        return _Policy(
            d.ttl_s if ttl_s is None else ttl_s,
            d.stale_ttl_s if stale_ttl_s is None else stale_ttl_s,
            d.fail_safe_max_s if fail_safe_max_s is None else fail_safe_max_s,
            d.negative_ttl_s if negative_ttl_s is None else negative_ttl_s,
            d.soft_timeout_s if soft_timeout_s is None else soft_timeout_s,
            tuple(self._full_tag(t) for t in tags),
        )

    def _encode(
        self, key: str, value: Any, policy: _Policy, load_s: float
    ) -> tuple[bytes, float, _Meta]:
        now = self.clock()
        if value is None:
            fresh = stale = hold = now + policy.negative_ttl_s
        else:
            fresh = now + policy.ttl_s
            stale = fresh + policy.stale_ttl_s
            hold = fresh + max(policy.stale_ttl_s, policy.fail_safe_max_s)
        try:
            payload = orjson.dumps([fresh, stale, hold, value, policy.tags, load_s])
            meta = _meta_of(fresh, stale, hold, load_s, value, policy.tags)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise CacheError(key, f"the value cannot be serialised to JSON ({exc})") from exc
        if len(payload) > self.max_value_bytes:
            raise CacheError(
                key,
                f"the serialised value is {len(payload)} bytes, over max_value_bytes="
                f"{self.max_value_bytes}; cache something smaller or raise the bound",
            )
        return payload, hold - now, meta

    async def _store(self, full: str, payload: bytes, hold_s: float, meta: _Meta) -> None:
        if hold_s <= 0:
            return
        self._l1_put(full, payload, meta)
        await self._timed("set", self.l2.set(full, payload, hold_s, meta.tags))

    def _l1_put(self, full: str, payload: bytes, meta: _Meta) -> None:
        # -ln(random()) <= 36.8 for every nonzero double random() returns, so before
        # fresh - load_s * beta * 37 an early refresh cannot fire: L1 hits skip the draw
        reach = meta.load_s * self.early_refresh_beta * _XFETCH_REACH
        meta.early_at = meta.fresh - reach if reach > 0.0 else math.inf
        now = self.clock()
        ttl_s = min(meta.hold - now, self.l1_max_ttl_s)
        meta.l1_fresh = min(meta.fresh, now + ttl_s)
        self.l1.put(full, payload, ttl_s, meta.tags, meta=meta, meta_bytes=meta.size)

    async def _l2_get(self, full: str) -> bytes | None:
        started = time.perf_counter()
        try:
            return await self.l2.get(full)
        finally:
            self._l2_get_seconds.observe(time.perf_counter() - started)

    async def _timed(self, op: str, call: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        try:
            return await call
        finally:
            self._l2_seconds[op].observe(time.perf_counter() - started)

    @staticmethod
    def _decode(raw: bytes | None) -> _Meta | None:
        """The entry in `raw`, or None when it is absent or not an envelope of ours.

        On every L2 hit: unpacked by position, no generator or copier planning
        (the value's copier is planned on its second read, see `_HAND_OVER`).
        """
        if raw is None:
            return None
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if type(envelope) is not list:
            return None  # not ours (another writer on this prefix): a miss
        if len(envelope) == 6:
            fresh, stale, hold, value, tags, load_s = envelope
        elif len(envelope) == 5:  # written before load_s existed
            fresh, stale, hold, value, tags = envelope
            load_s = 0.0
        else:
            return None
        number = _NUMBER
        if (
            type(fresh) not in number
            or type(stale) not in number
            or type(hold) not in number
            or type(load_s) not in number
            or type(tags) is not list
        ):
            return None
        names = tuple(t for t in tags if type(t) is str) if tags else ()
        fresh, stale, hold, load_s = float(fresh), float(stale), float(hold), float(load_s)
        if value is None or type(value) in _IMMUTABLE:
            return _Meta(fresh, stale, hold, load_s, value, 0, None, names)
        return _Meta(fresh, stale, hold, load_s, value, len(raw), _HAND_OVER, names, raw=raw)

    def _decode_entry(self, meta: Any, payload: bytes) -> _Meta | None:
        return meta if isinstance(meta, _Meta) else self._decode(payload)

    def _full_key(self, key: str) -> str:
        if type(key) is str and key.isascii() and 0 < len(key) <= self.max_key_bytes:
            return self._key_prefix + key  # ASCII: valid UTF-8, one byte per character
        return self._key_prefix + self._checked(key, "key")

    def _full_tag(self, tag: str) -> str:
        return f"{self.prefix}:t:{self._checked(tag, 'tag')}"

    def _checked(self, name: str, what: str) -> str:
        if not isinstance(name, str) or not name:
            raise CacheError(name, f"a cache {what} must be a non-empty string")
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise CacheError(name, f"the {what} is not valid UTF-8 ({exc})") from exc
        if size > self.max_key_bytes:
            raise CacheError(
                name, f"the {what} is {size} bytes, over max_key_bytes={self.max_key_bytes}"
            )
        return name

    # -- invalidation messages ----------------------------------------------------

    async def _publish(self, *, keys: Sequence[str] = (), tags: Sequence[str] = ()) -> None:
        if self._start is None:
            await self.start()
        message: dict[str, Any] = {"o": self._origin}
        if len(keys) + len(tags) > _MAX_MESSAGE_KEYS:
            message["all"] = True
        else:
            message["k"] = list(keys)
            message["t"] = list(tags)
        await self._timed("publish", self.l2.publish(self.channel, orjson.dumps(message)))

    def _on_message(self, data: bytes | None) -> None:
        message: Any = None
        if data is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                message = orjson.loads(data)
        if not isinstance(message, dict) or message.get("all"):
            # missed messages (reconnect) or an unreadable one: drop all we cannot vouch for
            self._invalidations["resync"].inc()
            self.l1.clear()
            self._dirty.update(self._flights)
            return
        if message.get("o") == self._origin:
            return
        self._invalidations["received"].inc()
        self._drop_keys([k for k in message.get("k", ()) if isinstance(k, str)])
        self._drop_tags([t for t in message.get("t", ()) if isinstance(t, str)])

    def _drop_keys(self, keys: Sequence[str]) -> None:
        for full in keys:
            self.l1.delete(full)
            if full in self._flights:
                self._dirty.add(full)

    def _drop_tags(self, tags: Sequence[str]) -> None:
        for tag in tags:
            self.l1.delete_tag(tag)
        if tags:  # which in-flight loads carry the tag is unknown: none may store
            self._dirty.update(self._flights)
