"""Redis limiter storage: GCRA in a Lua script, on the server's clock.

Flow of one decision::

    decide(key) ─▶ breaker admits? ─no (open)─▶ on_error policy (local limiter or deny)
                   │ yes (closed, or the one half-open probe)
                   ▼
                 EVALSHA gcra.lua (one round trip, within timeout_s)
                   ├─ NOSCRIPT (restart, failover, SCRIPT FLUSH) ─▶ SCRIPT LOAD, EVALSHA again
                   ├─ error or timeout ─▶ breaker opens for recheck_after_s ─▶ on_error policy
                   └─ reply ─▶ Decision (a probe's success closes the breaker)

The breaker is `tenfold.resilience.CircuitBreaker` (one failure opens it: one
timeout already cost a caller `timeout_s`). Redis is spoken through the
process's shared client (`tenfold.clients.redis`, shared with the cache): a
`tenfold.resp.RespClient`, a lean asyncio client
(one socket by default): concurrent `decide` calls write their EVALSHA at once
on the shared connection and their replies come back in order (auto-pipelining),
so N concurrent callers share round trips without any queue here, and a single
caller pays one round trip plus a few microseconds of Python. Each caller waits
at most `timeout_s` for its own decision; one that gives up leaves the
connection in step for the others.

`decide_many` sends one EVALSHA per item in one pipeline. The script reads
`TIME` itself, so clients with skewed clocks still share one limit, and sets
the TAT key with a TTL so idle subjects vanish.

`on_error="open"` (default) answers from a per-process `MemoryStorage` with the
same rules while Redis is unreachable, and logs a warning once per outage;
`on_error="closed"` denies every request with `Retry-After: closed_retry_after_s`.
"""

from __future__ import annotations

import asyncio
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
from tenfold.resilience import BreakerState

try:
    from tenfold.clients.redis import RedisClient, outage_breaker, redis_clients
    from tenfold.resp import RespReplyError, pack, pack_bulk
except ImportError as exc:  # pragma: no cover - only without the extra (hiredis)
    raise MissingDependency("hiredis", "redis", "a redis:// limits URL") from exc

__all__ = ["SCRIPT", "RedisStorage"]

log = logging.getLogger("tenfold.limits.redis")

SCRIPT = files("tenfold.limits").joinpath("gcra.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode(), usedforsecurity=False).hexdigest()

_ERRORS = (RespReplyError, OSError, TimeoutError)  # RespConnectionError is an OSError
OnError = Literal["open", "closed"]


class RedisStorage(LimiterStorage):
    """TATs in Redis, shared by every process that uses the same server and prefix.

    Args:
        url: `redis://[:password@]host:port/db` or `rediss://...`.
        prefix: prepended to every key, e.g. one per application.
        timeout_s: bound on one decision or one batch, connect included.
        connections: sockets to Redis, used round robin; every one carries
            pipelined calls, so 1 serves thousands of concurrent callers.
        on_error: "open" (answer from a local memory limiter) or "closed"
            (deny) while Redis is down or slow.
        closed_retry_after_s: the `retry_after_s` of a fail-closed denial.
        recheck_after_s: after a failure, how long the breaker stays open (apply
            `on_error` without trying Redis, so a dead server does not cost a
            timeout per request) before one probe is let through.
        fallback: the local storage used by `on_error="open"`.
        clock: monotonic seconds, for the breaker only (GCRA uses Redis TIME).

    Attributes:
        client: the process's shared client for `url` (released by `close`).
        breaker: the circuit breaker in front of every decision.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "tenfold:rl:",
        timeout_s: float = 0.25,
        connections: int = 1,
        on_error: OnError = "open",
        closed_retry_after_s: float = 1.0,
        recheck_after_s: float = 1.0,
        fallback: MemoryStorage | None = None,
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
        if connections < 1:
            raise ConfigError(where, f"connections must be >= 1, got {connections!r}")
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
        self._loaded = False
        self.breaker = outage_breaker(f"redis-limits {where}", recheck_after_s, clock)
        # The policy without the `async with` wrapper: the hot path stays one call deep.
        self._breaker = self.breaker.machine
        self.client: RedisClient = redis_clients.acquire(
            url, connect_timeout_s=timeout_s, connections=connections
        )
        self._client = self.client.commands
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStorage:
        """The storage for `url`, with keyword `options` as in the constructor."""
        return cls(url, **options)

    async def decide(self, key: str, rule: Rule, cost: int = 1) -> Decision:
        ticket = self._breaker.admit()
        if ticket is None:
            return self._degraded(key, rule, cost)
        try:
            if self._loaded:  # the hot path: one call, bounded by the client's own timer
                command = b"%s%s%s%s" % (  # EVALSHA sha 1 key interval tolerance cost
                    _EVALSHA_HEAD,
                    pack_bulk(self.prefix + key),
                    _rule_tail(rule),
                    pack_bulk(b"%d" % cost),
                )
                try:
                    reply = await self._client.execute_packed(command, timeout_s=self.timeout_s)
                except RespReplyError as exc:
                    if not exc.message.startswith("NOSCRIPT"):
                        raise
                    self._loaded = False  # restart, failover or SCRIPT FLUSH: load, redo
            if not self._loaded:
                async with asyncio.timeout(self.timeout_s):
                    await self._load()
                    reply = await self._client.execute(
                        "EVALSHA", SCRIPT_SHA, 1, self.prefix + key, *_rule_args(rule), cost
                    )
        except _ERRORS as exc:
            self._failed(ticket, exc)
            return self._degraded(key, rule, cost)
        self._succeeded(ticket)
        return _decision(reply, rule)

    async def decide_many(self, items: Sequence[DecideItem]) -> list[Decision]:
        if not items:
            return []
        ticket = self._breaker.admit()
        if ticket is None:
            return [self._degraded(key, rule, cost) for key, rule, cost in items]
        try:
            async with asyncio.timeout(self.timeout_s):  # a batch: its cost is amortised
                replies = await self._send(items)
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
        except _ERRORS as exc:
            self._failed(ticket, exc)
            return [self._degraded(key, rule, cost) for key, rule, cost in items]
        self._succeeded(ticket)
        return [_decision(reply, rule) for reply, (_, rule, _) in zip(replies, items, strict=True)]

    async def close(self) -> None:
        if not self._closed:  # the shared client closes with its last holder
            self._closed = True
            await redis_clients.release(self.client)

    async def _send(self, items: Sequence[DecideItem]) -> list[Any]:
        """One pipeline of EVALSHAs; NOSCRIPT → load the script and redo those items once.

        Replies may be exceptions (per item); errors of the round trip raise.
        """
        if not self._loaded:
            await self._load()
        replies = await self._pipeline(items)
        missing = [i for i, reply in enumerate(replies) if _noscript(reply)]
        if missing:  # the script was flushed: load it, redo only those items
            await self._load()
            redone = await self._pipeline([items[i] for i in missing])
            for i, reply in zip(missing, redone, strict=True):
                replies[i] = reply
        return replies

    async def _load(self) -> None:
        sha = await self._client.execute("SCRIPT", "LOAD", SCRIPT)
        if sha != SCRIPT_SHA.encode():  # pragma: no cover - only if Redis hashed differently
            raise ConfigError(self.where, f"SCRIPT LOAD returned {sha!r}, expected {SCRIPT_SHA}")
        self._loaded = True

    async def _pipeline(self, items: Sequence[DecideItem]) -> list[Any]:
        prefix = self.prefix
        return await self._client.pipeline(
            [
                ("EVALSHA", SCRIPT_SHA, 1, prefix + key, *_rule_args(rule), cost)
                for key, rule, cost in items
            ]
        )

    def _succeeded(self, ticket: int) -> None:
        breaker = self._breaker
        if breaker.probes_in_flight:  # a half-open probe: this success may close it
            breaker.succeeded(ticket)
            if breaker.state is BreakerState.CLOSED:
                log.info("%s answers again; shared limits are back", self.where)
        else:
            breaker.succeeded(ticket)

    def _failed(self, ticket: int, exc: BaseException) -> None:
        self._loaded = False  # a restarted server has no scripts
        breaker = self._breaker
        was_closed = breaker.state is BreakerState.CLOSED
        breaker.failed(ticket)
        if was_closed and breaker.state is BreakerState.OPEN:  # once per outage
            then = "answering from a local limiter" if self.on_error == "open" else "denying"
            log.warning(
                "%s is unavailable (%s: %s); %s until it answers, rechecking every %g s",
                self.where,
                type(exc).__name__,
                exc or "timed out",
                then,
                self.recheck_after_s,
            )

    def _mark_down(self, exc: BaseException) -> None:
        """Open the breaker as if a call had failed with `exc` (tests, operators)."""
        ticket = self._breaker.admit()
        if ticket is not None:
            self._failed(ticket, exc)

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


# EVALSHA's array header (7 items), name, sha and key count: the same for every call.
_EVALSHA_HEAD = pack(("EVALSHA", SCRIPT_SHA, 1)).replace(b"*3\r\n", b"*7\r\n", 1)


@functools.lru_cache(maxsize=1024)
def _rule_tail(rule: Rule) -> bytes:
    return b"".join(map(pack_bulk, _rule_args(rule)))


def _noscript(reply: Any) -> bool:
    return isinstance(reply, RespReplyError) and reply.message.startswith("NOSCRIPT")


def _decision(reply: list[Any], rule: Rule) -> Decision:
    allowed, remaining, retry_after, reset_after = reply
    return Decision(
        allowed=bool(allowed),
        remaining=int(remaining),
        retry_after_s=float(retry_after),
        reset_after_s=float(reset_after),
        limit=rule.limit,
    )
