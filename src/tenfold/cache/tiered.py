"""TieredCache: L1 (in process) → L2 (shared) → loader, with single-flight and fail-safe.

Flow of one `get_or_load(key, loader)`::

    L1 ─hit─▶ L2 ─hit (copied to L1)─▶ entry?
      fresh (now < fresh_until)              ─▶ value
      stale (now < stale_until)              ─▶ value, and one background refresh
      expired but held (now < hold_until)    ─▶ join/start the load; if it raises or
                                                runs past soft_timeout_s ─▶ old value
      none                                   ─▶ join/start the load ─▶ its value or error

An entry is one orjson envelope `[fresh_until, stale_until, hold_until, value, tags]`
stored as the same bytes in L1 and L2, so every hit decodes a private copy.
Times are wall-clock seconds (`clock`), because processes share them via L2;
`hold_until = fresh_until + max(stale_ttl_s, fail_safe_max_s)` is the L2 TTL.

Invariants:
- At most one loader call per key is in flight in a process (`_flights`).
- A load that overlapped an invalidation of its key (or of any tag, or a
  resync) returns its value to its callers but writes neither L1 nor L2
  (`_dirty`), so an invalidation is never undone by an older load.
- Nothing that fails to serialise, or whose envelope exceeds `max_value_bytes`,
  is stored anywhere: the caller gets `CacheError`.

Invalidation propagation bound: `invalidate`, `invalidate_tag` and `set`
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
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tenfold.cache.base import L2Backend
from tenfold.cache.l1 import L1Cache
from tenfold.errors import CacheError, ConfigError
from tenfold.observe import metrics

__all__ = ["Loader", "TieredCache"]

log = logging.getLogger("tenfold.cache")

Loader = Callable[[], Awaitable[Any]]
_MAX_MESSAGE_KEYS = 1000  # a bigger batch is published as "drop everything"


@dataclass(frozen=True, slots=True)
class _Policy:
    ttl_s: float
    stale_ttl_s: float
    fail_safe_max_s: float
    negative_ttl_s: float
    soft_timeout_s: float | None
    tags: tuple[str, ...]


class TieredCache:
    """A two-level cache with single-flight loads, stale-while-revalidate and fail-safe.

    Args:
        l1: the in-process cache.
        l2: the shared cache (`memory://` or Redis); `close()` closes it.
        prefix: namespace of every key, tag and the invalidation channel.
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
        ]
        for name, value, ok in checks:
            if not ok:
                raise ConfigError(f"cache {prefix} {name}", f"out of range: {value!r}")
        self.l1 = l1
        self.l2 = l2
        self.prefix = prefix
        self.channel = f"{prefix}:inv"
        self.clock = clock
        self.hard_timeout_s = hard_timeout_s
        self.l1_max_ttl_s = l1_max_ttl_s
        self.max_value_bytes = max_value_bytes
        self.max_key_bytes = max_key_bytes
        self._defaults = _Policy(
            ttl_s, stale_ttl_s, fail_safe_max_s, negative_ttl_s, soft_timeout_s, ()
        )
        self._origin = uuid.uuid4().hex  # our own messages are skipped on receipt
        self._flights: dict[str, asyncio.Task[bytes | None]] = {}
        self._dirty: set[str] = set()  # in-flight keys invalidated since their load began
        self._start: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the invalidation channel (also done on first use); idempotent."""
        if self._start is None:
            self._start = asyncio.get_running_loop().create_task(
                self.l2.subscribe(self.channel, self._on_message)
            )
        await asyncio.shield(self._start)

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
        full = self._full_key(key)
        policy = self._policy(
            ttl_s, stale_ttl_s, fail_safe_max_s, negative_ttl_s, soft_timeout_s, tags
        )
        if self._start is None or not self._start.done():
            await self.start()
        now = self.clock()
        envelope = self._decode(self.l1.get(full))
        tier = "l1"
        if envelope is None:
            metrics.cache_misses.labels("l1").inc()
            flight = self._flights.get(full)
            if flight is not None:  # a load is under way: join it, do not ask L2 as well
                payload = await asyncio.shield(flight)
                return None if payload is None else orjson.loads(payload)[3]
            raw = await self.l2.get(full)
            envelope = self._decode(raw)
            tier = "l2"
            if envelope is None or now >= envelope[2]:
                metrics.cache_misses.labels("l2").inc()
                # a load may have landed while L2 answered: it wrote L1 first
                envelope = self._decode(self.l1.get(full))
                tier = "l1"
            else:
                assert raw is not None
                self.l1.put(full, raw, min(envelope[2] - now, self.l1_max_ttl_s), envelope[4])
        if envelope is not None:
            if now < envelope[0]:
                metrics.cache_hits.labels(tier).inc()
                return envelope[3]
            if now < envelope[1]:
                metrics.cache_hits.labels("stale").inc()
                self._flight(full, key, loader, policy)
                return envelope[3]
        flight = self._flight(full, key, loader, policy)
        if envelope is None or now >= envelope[2]:
            payload = await asyncio.shield(flight)
        else:
            try:
                async with asyncio.timeout(policy.soft_timeout_s):
                    payload = await asyncio.shield(flight)
            except CacheError:
                raise
            except Exception as exc:  # the loader failed or is slow: serve the old value
                log.debug("cache %s: serving the old value of %r (%r)", self.prefix, key, exc)
                metrics.cache_hits.labels("fail_safe").inc()
                return envelope[3]
        return None if payload is None else orjson.loads(payload)[3]

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
        payload, hold_s = self._encode(key, value, policy)
        if full in self._flights:
            self._dirty.add(full)
        await self._store(full, payload, hold_s, policy.tags)
        await self._publish(keys=[full])

    async def invalidate(self, key: str) -> None:
        """Drop `key` from this L1 and from L2, then from every process's L1."""
        full = self._full_key(key)
        metrics.cache_invalidations.labels("key").inc()
        self._drop_keys([full])
        await self.l2.delete(full)
        await self._publish(keys=[full])

    async def invalidate_tag(self, tag: str) -> None:
        """Drop every entry stored with `tag`, here, in L2 and in every process's L1."""
        full_tag = self._full_tag(tag)
        metrics.cache_invalidations.labels("tag").inc()
        self._drop_tags([full_tag])
        await self.l2.delete_tag(full_tag)
        await self._publish(tags=[full_tag])

    # -- loading ------------------------------------------------------------------

    def _flight(
        self, full: str, key: str, loader: Loader, policy: _Policy
    ) -> asyncio.Task[bytes | None]:
        flight = self._flights.get(full)
        if flight is None:
            self._dirty.discard(full)
            flight = asyncio.get_running_loop().create_task(self._load(full, key, loader, policy))
            self._flights[full] = flight
            flight.add_done_callback(functools.partial(self._landed, full))
        return flight

    def _landed(self, full: str, task: asyncio.Task[bytes | None]) -> None:
        if self._flights.get(full) is task:
            del self._flights[full]
            self._dirty.discard(full)
        if not task.cancelled() and task.exception() is not None:  # marks it retrieved
            log.info("cache %s: loader for %r failed: %r", self.prefix, full, task.exception())

    async def _load(self, full: str, key: str, loader: Loader, policy: _Policy) -> bytes | None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.hard_timeout_s):
                value = await loader()
        finally:
            metrics.cache_loader_seconds.observe(time.perf_counter() - started)
        if value is None and policy.negative_ttl_s <= 0:
            return None
        payload, hold_s = self._encode(key, value, policy)
        if full not in self._dirty:  # no invalidation raced with this load
            await self._store(full, payload, hold_s, policy.tags)
        return payload

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

    def _encode(self, key: str, value: Any, policy: _Policy) -> tuple[bytes, float]:
        now = self.clock()
        if value is None:
            fresh = stale = hold = now + policy.negative_ttl_s
        else:
            fresh = now + policy.ttl_s
            stale = fresh + policy.stale_ttl_s
            hold = fresh + max(policy.stale_ttl_s, policy.fail_safe_max_s)
        try:
            payload = orjson.dumps([fresh, stale, hold, value, policy.tags])
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise CacheError(key, f"the value cannot be serialised to JSON ({exc})") from exc
        if len(payload) > self.max_value_bytes:
            raise CacheError(
                key,
                f"the serialised value is {len(payload)} bytes, over max_value_bytes="
                f"{self.max_value_bytes}; cache something smaller or raise the bound",
            )
        return payload, hold - now

    async def _store(self, full: str, payload: bytes, hold_s: float, tags: Sequence[str]) -> None:
        if hold_s <= 0:
            return
        self.l1.put(full, payload, min(hold_s, self.l1_max_ttl_s), tags)
        await self.l2.set(full, payload, hold_s, tags)

    @staticmethod
    def _decode(raw: bytes | None) -> list[Any] | None:
        if raw is None:
            return None
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(envelope, list) or len(envelope) != 5:
            return None  # not ours (another writer on this prefix): a miss
        return envelope

    def _full_key(self, key: str) -> str:
        return f"{self.prefix}:k:{self._checked(key, 'key')}"

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
        await self.l2.publish(self.channel, orjson.dumps(message))

    def _on_message(self, data: bytes | None) -> None:
        message: Any = None
        if data is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                message = orjson.loads(data)
        if not isinstance(message, dict) or message.get("all"):
            # missed messages (reconnect) or an unreadable one: drop all we cannot vouch for
            metrics.cache_invalidations.labels("resync").inc()
            self.l1.clear()
            self._dirty.update(self._flights)
            return
        if message.get("o") == self._origin:
            return
        metrics.cache_invalidations.labels("received").inc()
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
