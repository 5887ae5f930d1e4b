"""`Runtime`: every tenfold component an app process uses, built from one `Settings`.

runtime = Runtime(load_settings())      # nothing is contacted yet
await runtime.start()                   # pools, topology, cache pub/sub, relays, consumers
...                                     # runtime.db / .bus / .cache / .limiter / .tokens ...
await runtime.stop()                    # consumers stop, the outbox drains, pools close

`tenfold.gateway.install(app)` calls `start` and `stop` from the app's lifespan.
The gateway is the one package that wires capabilities together; the
capabilities themselves still do not import each other. Capabilities on the
same server share its client: the cache and the limiter one Redis client, the
event bus and the realtime broker one NATS connection, per process
(`tenfold.clients`, acquired by URL when built or started, released by `stop`);
each backend class comes from the one scheme registry, `tenfold.backends`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import Scope

from tenfold.cache import L1Cache, TieredCache
from tenfold.cache import from_url as cache_from_url
from tenfold.config import Settings, load_settings
from tenfold.data import ShardedDatabase
from tenfold.errors import ConfigError, TenfoldError
from tenfold.events import EventBus
from tenfold.gateway import metrics as gateway_metrics
from tenfold.gateway.auth import AccessTokens, PasswordHasher, RefreshTokens
from tenfold.gateway.auth.passwords import OWASP, TESTING
from tenfold.limits import AdmissionController, AimdLimit, RateLimiter
from tenfold.limits import from_url as limits_from_url
from tenfold.observe import tracing
from tenfold.realtime import Hub, HubLimits, broker_from_url

__all__ = ["Principal", "Runtime"]

log = logging.getLogger("tenfold.gateway")

_MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a request: the token's subject and claims."""

    subject: str
    claims: dict[str, Any] = field(default_factory=dict)


class _NoAdmission:
    """Stands in for the controller when admission control is switched off."""

    @contextlib.asynccontextmanager
    async def admit(self, priority: str) -> AsyncIterator[None]:
        yield


class Runtime:
    """The components of one app process; see the module docstring.

    Args:
        settings: the configuration (`load_settings()` when None).

    Raises:
        ConfigError: a malformed rate-limit rule, a short auth secret, a bad URL —
            at construction, so a bad deployment fails at start-up.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        s = settings or load_settings()
        self.settings = s
        if s.trace_exporter != "none" and not tracing.enabled():
            tracing.configure(s.trace_exporter)
        self.db = ShardedDatabase(s)
        self.bus = EventBus(self.db)
        self.cache = TieredCache(L1Cache(), cache_from_url(s.cache_url), prefix=s.cache_prefix)
        self._slot_tasks: set[asyncio.Task[None]] = set()
        self.db.on_slots_moved(self._slots_moved)
        self.limiter = RateLimiter(s.rate_limits, limits_from_url(s.limits_url))
        self.admission: AdmissionController | _NoAdmission
        if s.admission_enabled:
            initial = s.admission_initial_limit
            self.admission = AdmissionController(
                AimdLimit(
                    clock=time.monotonic,
                    initial_limit=initial,
                    min_limit=max(1, initial // 8),
                    max_limit=s.admission_max_limit,
                ),
                max_queue=s.admission_max_queue,
                max_wait_s=s.admission_max_wait_s,
            )
        else:
            self.admission = _NoAdmission()
        self.tokens = AccessTokens(
            _auth_secret(s),
            issuer=s.auth_issuer,
            audience=s.auth_audience,
            ttl_s=s.access_ttl_s,
            max_lifetime_s=s.access_token_max_lifetime_s,
        )
        self.refresh = RefreshTokens(self.db, ttl_s=s.refresh_ttl_s)
        profiles = {"default": OWASP, "testing": TESTING}
        if s.password_profile not in profiles:
            raise ConfigError(
                "TENFOLD_PASSWORD_PROFILE",
                f"unknown profile {s.password_profile!r}; use 'default' (OWASP argon2id "
                "parameters) or 'testing' (cheap, for test suites only)",
            )
        self.passwords = PasswordHasher(profiles[s.password_profile])
        self.realtime = Hub(
            broker_from_url(
                s.events_url,
                history_size=s.realtime_history_size,
                history_ttl_s=s.realtime_history_ttl_s,
                presence_ttl_s=s.realtime_presence_ttl_s,
                connect_timeout_s=s.events_connect_timeout_s,
            ),
            authenticate=self.verify_token,
            limits=HubLimits(
                max_frame_bytes=s.realtime_max_frame_bytes,
                auth_timeout_s=s.realtime_auth_timeout_s,
                send_queue=s.realtime_send_queue,
                max_channels=s.realtime_max_channels,
                publish_rate=s.realtime_publish_rate,
                publish_burst=s.realtime_publish_burst,
                max_conns_per_user=s.realtime_max_conns_per_user,
                ping_interval_s=s.realtime_ping_interval_s,
                reauthorize_interval_s=s.realtime_reauthorize_interval_s,
            ),
        )
        self.started = False

    async def start(self) -> None:
        """Open pools and the topology, subscribe the cache, start relays and consumers."""
        if self.started:
            return
        await self.db.open()
        try:
            await self.cache.start()
            await self.realtime.start()
            await self.bus.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.realtime.stop()
            await self.db.close()
            raise
        self.started = True

    def _slots_moved(self, slots: list[int]) -> None:
        """A new topology moved `slots`: drop cache entries tagged with them, now and
        once more after every process surely re-read the topology (two TTLs), which
        drops what a process with the old map filled from the old owner meanwhile."""
        if not slots:
            return
        task = asyncio.ensure_future(self._drop_slot_entries(slots))
        self._slot_tasks.add(task)
        task.add_done_callback(self._slot_tasks.discard)

    async def _drop_slot_entries(self, slots: list[int]) -> None:
        for delay in (0.0, 2 * self.settings.topology_ttl_s):
            await asyncio.sleep(delay)
            try:
                await self.cache.invalidate_slots(slots)
            except Exception:
                log.exception("dropping cache entries of %s moved slots failed", len(slots))

    async def stop(self) -> None:
        """Stop consumers, drain the outbox (bounded), close the cache and the pools."""
        if not self.started:
            return
        self.started = False
        for task in list(self._slot_tasks):
            task.cancel()
        try:
            with contextlib.suppress(Exception):
                await self.realtime.stop()  # clients get 1001 and reconnect elsewhere
            await self.bus.stop(drain_timeout_s=self.settings.drain_timeout_s)
        finally:
            with contextlib.suppress(Exception):
                await self.cache.close()
            with contextlib.suppress(Exception):
                await self.limiter.storage.close()
            await self.db.close()

    def authenticate(self, scope: Scope) -> Principal | None:
        """Verify the request's Bearer token once; remember the principal or the error.

        A missing token is anonymous (None). A bad one is also None here, with
        the error kept in the scope so a route that needs a user answers 401
        with the reason, while public routes still work.
        """
        value = None
        for name, raw in scope["headers"]:
            if name == b"authorization":
                value = raw
                break
        if value is None:
            return None
        scheme, _, token = value.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            scope["tenfold.auth_error"] = "the Authorization header must be 'Bearer <token>'"
            return None
        try:
            claims = self.tokens.verify(token)
        except TenfoldError as exc:
            scope["tenfold.auth_error"] = getattr(exc, "reason", None) or str(exc)
            return None
        principal = Principal(claims.subject, dict(claims.extra))
        scope["tenfold.principal"] = principal
        return principal

    def verify_token(self, token: str) -> Principal | None:
        """The principal of an access token, or None when it is not valid (WebSocket auth)."""
        try:
            claims = self.tokens.verify(token)
        except TenfoldError:
            return None
        return Principal(claims.subject, dict(claims.extra))

    def sample_pools(self) -> None:
        """Set the pool gauges from each pool's live counts (called on every scrape)."""
        if not self.started:
            return
        for pool in self.db.all_pools():
            stats = pool.stats()
            gateway_metrics.pool_in_use.labels(pool.name).set(stats.in_use)
            gateway_metrics.pool_size.labels(pool.name).set(stats.max_size)

    async def readiness(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """What `/readyz` reports: whether this process can serve, and why.

        Ready needs the catalog (routing and ids) and, by `readiness_shards`,
        at least one shard ("any", the default) or every shard ("all"). One
        dead or stalled shard is reported, not fatal: under a load balancer it
        would otherwise take every process out of rotation, and the healthy
        shards' users with it; its own requests already fail fast (503). The
        cache, events and realtime brokers are checked as before.

        The body has one entry per shard (`ok`, `rtt_ms`, `breaker`, `in_use`,
        `stalled`, `error`), and `tenfold_shard_up{shard}` is set from it.
        """
        out: dict[str, Any] = {"ready": True, "checks": {}}
        checks = out["checks"]
        try:
            async with asyncio.timeout(timeout_s):
                health, catalog_error = await asyncio.gather(self.db.health(), _catalog_error(self))
        except TimeoutError:
            checks["shards"] = {"ok": False, "error": f"no answer within {timeout_s} s"}
            out["ready"] = False
        else:
            checks["catalog"] = {"ok": catalog_error is None}
            if catalog_error is not None:
                checks["catalog"]["error"] = catalog_error
                out["ready"] = False
            for h in health:
                entry: dict[str, Any] = {
                    "ok": h.reachable,
                    "rtt_ms": None if h.rtt_ms is None else round(h.rtt_ms, 3),
                    "breaker": h.breaker,
                    "in_use": h.in_use,
                    "stalled": h.stalled,
                }
                if not h.reachable:
                    entry["error"] = h.error or "unreachable"
                checks[f"shard:{h.name}"] = entry
            up = sum(1 for h in health if h.reachable)
            needed = len(health) if self.settings.readiness_shards == "all" else 1
            out["shards_up"] = f"{up}/{len(health)}"
            if up < needed:
                out["ready"] = False
        for name, target in (
            ("cache", self.cache.l2),
            ("events", self.bus.backend),
            ("realtime", self.realtime.broker),
        ):
            probe = getattr(target, "ping", None)
            if probe is None:
                continue
            try:
                async with asyncio.timeout(timeout_s):
                    await probe()
            except Exception as exc:  # a readiness probe reports, never raises
                checks[name] = {"ok": False, "error": str(exc) or type(exc).__name__}
                out["ready"] = False
            else:
                checks[name] = {"ok": True}
        return out


async def _catalog_error(runtime: Runtime) -> str | None:
    """Why the catalog does not answer, or None when it does (readiness reports, never raises)."""
    try:
        await runtime.db.catalog.pool.ping()
    except TenfoldError as exc:
        return str(exc)
    return None


def _auth_secret(s: Settings) -> str:
    """The HMAC secret for access tokens: the setting, else a file shared by workers."""
    secret = s.auth_secret.get_secret_value()
    if secret:
        if len(secret.encode()) < _MIN_SECRET_BYTES:
            raise ConfigError(
                "TENFOLD_AUTH_SECRET",
                f"must be at least {_MIN_SECRET_BYTES} bytes; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`",
            )
        return secret
    return _secret_file(s.auth_secret_file)


def _secret_file(path: Path) -> str:
    """Read the secret file, creating it (mode 0600) on first use; workers race safely."""
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        if len(text) >= _MIN_SECRET_BYTES:
            return text
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
    try:
        os.link(tmp, path)  # first writer wins; the others read theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
