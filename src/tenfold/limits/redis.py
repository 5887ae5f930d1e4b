"""Redis limiter storage: GCRA in a Lua script, on the server's clock.

Flow of one decision::

    decide(key) ─▶ down recently? ─yes─▶ on_error policy (local limiter or deny)
                   │ no
                   ▼
                 EVALSHA gcra.lua (one round trip, within timeout_s)
                   ├─ NOSCRIPT (restart, failover, SCRIPT FLUSH) ─▶ SCRIPT LOAD, EVALSHA again
                   ├─ error or timeout ─▶ mark down for recheck_after_s ─▶ on_error policy
                   └─ reply ─▶ Decision

Concurrent `decide` calls are coalesced: a caller that finds no round trip in
flight sends its EVALSHA straight away; callers arriving while one is in flight
join a bounded queue (`max_batch`), and a single flusher sends everything
queued as one pipeline as soon as the previous round trip returns (no added
delay). Each caller still waits at most `timeout_s` for its own decision; a
failed pipeline gives every caller in it the `on_error` answer.

`decide_many` sends one EVALSHA per item in one pipeline. The script reads
`TIME` itself, so clients with skewed clocks still share one limit, and sets
the TAT key with a TTL so idle subjects vanish.

`on_error="open"` (default) answers from a per-process `MemoryStorage` with the
same rules while Redis is unreachable, and logs a warning once per outage;
`on_error="closed"` denies every request with `Retry-After: closed_retry_after_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import Any, Literal

from tenfold.config import redact_url
from tenfold.errors import ConfigError, MissingDependency
from tenfold.limits.base import DecideItem, LimiterStorage
from tenfold.limits.gcra import Decision
from tenfold.limits.memory import MemoryStorage
from tenfold.limits.rules import Rule

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import NoScriptError, RedisError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise MissingDependency("redis", "redis", "a redis:// limits URL") from exc

__all__ = ["SCRIPT", "RedisStorage"]

log = logging.getLogger("tenfold.limits.redis")

SCRIPT = files("tenfold.limits").joinpath("gcra.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode(), usedforsecurity=False).hexdigest()

_ERRORS = (RedisError, OSError, TimeoutError)
_Queued = tuple[str, Rule, int, "asyncio.Future[Any]"]  # (key, rule, cost, the caller's waiter)
OnError = Literal["open", "closed"]


class RedisStorage(LimiterStorage):
    """TATs in Redis, shared by every process that uses the same server and prefix.

    Args:
        url: `redis://[:password@]host:port/db` or `rediss://...`.
        prefix: prepended to every key, e.g. one per application.
        timeout_s: bound on one decision or one batch, connect included.
        max_connections: bound on the connection pool; callers beyond it wait
            (within `timeout_s`).
        on_error: "open" (answer from a local memory limiter) or "closed"
            (deny) while Redis is down or slow.
        closed_retry_after_s: the `retry_after_s` of a fail-closed denial.
        recheck_after_s: after a failure, how long to apply `on_error` without
            trying Redis, so a dead server does not cost a timeout per request.
        fallback: the local storage used by `on_error="open"`.
        max_batch: bound on the queue of coalesced `decide` calls (and so on one
            pipeline); a caller finding it full sends its own EVALSHA.
        clock: monotonic seconds, for `recheck_after_s` only (GCRA uses Redis TIME).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "tenfold:rl:",
        timeout_s: float = 0.25,
        max_connections: int = 64,
        on_error: OnError = "open",
        closed_retry_after_s: float = 1.0,
        recheck_after_s: float = 1.0,
        fallback: MemoryStorage | None = None,
        max_batch: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        where = f"redis limiter at {redact_url(url)}"
        if on_error not in ("open", "closed"):
            raise ConfigError(where, f'on_error must be "open" or "closed", got {on_error!r}')
        for name, value in (
            ("timeout_s", timeout_s),
            ("closed_retry_after_s", closed_retry_after_s),
            ("recheck_after_s", recheck_after_s),
        ):
            if not value > 0:
                raise ConfigError(where, f"{name} must be > 0, got {value!r}")
        if max_connections < 1:
            raise ConfigError(where, f"max_connections must be >= 1, got {max_connections!r}")
        if max_batch < 1:
            raise ConfigError(where, f"max_batch must be >= 1, got {max_batch!r}")
        self.url = url
        self.where = where
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.on_error: OnError = on_error
        self.closed_retry_after_s = closed_retry_after_s
        self.recheck_after_s = recheck_after_s
        self.fallback = fallback if fallback is not None else MemoryStorage()
        self.clock = clock
        self.failures = 0  # decisions answered by the on_error policy (a metric to watch)
        self._down_until: float | None = None
        self._loaded = False
        self.max_batch = max_batch
        self._queue: list[_Queued] = []  # coalesced decide() calls waiting for the flusher
        self._busy = False  # a decide() round trip (direct or flushed) is in flight
        self._flusher: asyncio.Task[None] | None = None
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: the caller's timeout is the bound
        )
        self._client = aioredis.Redis(connection_pool=pool)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStorage:
        """The storage for `url`, with keyword `options` as in the constructor."""
        return cls(url, **options)

    async def decide(self, key: str, rule: Rule, cost: int = 1) -> Decision:
        if self._skipping():
            return self._degraded(key, rule, cost)
        if not self._busy:  # nothing in flight: go straight through
            self._busy = True
            try:
                return await self._decide_direct(key, rule, cost)
            finally:
                self._busy = False
                self._kick()
        if len(self._queue) >= self.max_batch:  # queue full: own round trip
            return await self._decide_direct(key, rule, cost)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((key, rule, cost, waiter))
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await waiter
        except TimeoutError as exc:
            self._mark_down(exc)
            return self._degraded(key, rule, cost)
        if reply is None:  # the batch failed (already marked down) or Redis is down
            return self._degraded(key, rule, cost)
        if isinstance(reply, BaseException):
            if isinstance(reply, _ERRORS):
                self._mark_down(reply)
                return self._degraded(key, rule, cost)
            raise reply
        self._mark_up()
        return _decision(reply, rule)

    async def _decide_direct(self, key: str, rule: Rule, cost: int) -> Decision:
        try:
            async with asyncio.timeout(self.timeout_s):
                if not self._loaded:
                    await self._load()
                try:
                    reply = await self._evalsha(self._client, key, rule, cost)
                except NoScriptError:
                    await self._load()
                    reply = await self._evalsha(self._client, key, rule, cost)
        except _ERRORS as exc:
            self._mark_down(exc)
            return self._degraded(key, rule, cost)
        self._mark_up()
        return _decision(reply, rule)

    def _kick(self) -> None:
        """Start the flusher if calls are queued and no round trip is in flight."""
        if self._queue and not self._busy:
            self._busy = True
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send the queue as pipelines, one at a time, until it stays empty."""
        try:
            while True:
                batch = [q for q in self._queue[: self.max_batch] if not q[3].done()]
                del self._queue[: self.max_batch]
                if batch:
                    await self._flush_batch(batch)
                    await asyncio.sleep(0)  # let the woken callers queue their next call
                elif not self._queue:
                    return
        finally:
            self._busy = False
            self._flusher = None
            if self._queue:  # e.g. cancelled by close(): nobody may wait forever
                for *_, waiter in self._queue:
                    if not waiter.done():
                        waiter.set_result(None)
                self._queue.clear()

    async def _flush_batch(self, batch: list[_Queued]) -> None:
        replies: list[Any]
        if self._skipping():
            replies = [None] * len(batch)
        else:
            try:
                async with asyncio.timeout(self.timeout_s):
                    replies = await self._send([(k, r, c) for k, r, c, _ in batch])
            except _ERRORS as exc:
                self._mark_down(exc)
                replies = [None] * len(batch)
            except asyncio.CancelledError:  # close(): the callers get the on_error answer
                for *_, waiter in batch:
                    if not waiter.done():
                        waiter.set_result(None)
                raise
            except Exception as exc:  # e.g. ConfigError: each caller raises it, as decide() did
                replies = [exc] * len(batch)
        for (*_, waiter), reply in zip(batch, replies, strict=True):
            if not waiter.done():  # a cancelled or timed-out caller is skipped
                waiter.set_result(reply)

    async def decide_many(self, items: Sequence[DecideItem]) -> list[Decision]:
        if not items:
            return []
        if self._skipping():
            return [self._degraded(key, rule, cost) for key, rule, cost in items]
        try:
            async with asyncio.timeout(self.timeout_s):
                replies = await self._send(items)
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
        except _ERRORS as exc:
            self._mark_down(exc)
            return [self._degraded(key, rule, cost) for key, rule, cost in items]
        self._mark_up()
        return [_decision(reply, rule) for reply, (_, rule, _) in zip(replies, items, strict=True)]

    async def close(self) -> None:
        flusher = self._flusher
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        await self._client.aclose()

    async def _send(self, items: Sequence[DecideItem]) -> list[Any]:
        """One pipeline of EVALSHAs; NOSCRIPT → load the script and redo those items once.

        Replies may be exceptions (per item); errors of the round trip raise.
        """
        if not self._loaded:
            await self._load()
        replies = await self._pipeline(items)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # the script was flushed: load it, redo only those items
            await self._load()
            redone = await self._pipeline([items[i] for i in missing])
            for i, reply in zip(missing, redone, strict=True):
                replies[i] = reply
        return replies

    async def _load(self) -> None:
        sha = await self._client.script_load(SCRIPT)
        if sha != SCRIPT_SHA:  # pragma: no cover - only if Redis hashed differently
            raise ConfigError(self.where, f"SCRIPT LOAD returned {sha}, expected {SCRIPT_SHA}")
        self._loaded = True

    async def _evalsha(self, client: Any, key: str, rule: Rule, cost: int) -> list[Any]:
        reply: list[Any] = await client.evalsha(
            SCRIPT_SHA, 1, self.prefix + key, *_rule_args(rule), cost
        )
        return reply

    async def _pipeline(self, items: Sequence[DecideItem]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, rule, cost in items:
                pipe.evalsha(SCRIPT_SHA, 1, self.prefix + key, *_rule_args(rule), cost)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _skipping(self) -> bool:
        return self._down_until is not None and self.clock() < self._down_until

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_until is None:
            then = "answering from a local limiter" if self.on_error == "open" else "denying"
            log.warning(
                "%s is unavailable (%s: %s); %s until it answers, rechecking every %g s",
                self.where,
                type(exc).__name__,
                exc or "timed out",
                then,
                self.recheck_after_s,
            )
        self._loaded = False  # a restarted server has no scripts
        self._down_until = self.clock() + self.recheck_after_s

    def _mark_up(self) -> None:
        if self._down_until is not None:
            log.info("%s answers again; shared limits are back", self.where)
            self._down_until = None

    def _degraded(self, key: str, rule: Rule, cost: int) -> Decision:
        self.failures += 1
        if self.on_error == "open":
            return self.fallback.decide_now(self.prefix + key, rule, cost)
        wait_s = self.closed_retry_after_s
        return Decision(
            allowed=False, remaining=0, retry_after_s=wait_s, reset_after_s=wait_s, limit=rule.limit
        )


@functools.lru_cache(maxsize=1024)
def _rule_args(rule: Rule) -> tuple[str, str]:
    # The script's ARGV for a rule, formatted once: rules are few and frozen.
    return repr(rule.emission_interval_s), repr(rule.tolerance_s)


def _decision(reply: list[Any], rule: Rule) -> Decision:
    allowed, remaining, retry_after, reset_after = reply
    return Decision(
        allowed=bool(allowed),
        remaining=int(remaining),
        retry_after_s=float(retry_after),
        reset_after_s=float(reset_after),
        limit=rule.limit,
    )
