"""One typed settings object: `TENFOLD_*` environment variables or `tenfold.toml`.

Every backend is chosen by URL scheme. Precedence, highest first: arguments to
`load_settings`, environment variables, the TOML file (`TENFOLD_CONFIG` or
`./tenfold.toml`), defaults. The defaults are the embedded mode: four SQLite
shards and a SQLite catalog under `./data`.

Shards are given either as a template and a count::

    TENFOLD_SHARD_URL=postgresql://127.0.0.1/app_{n}   TENFOLD_SHARD_COUNT=8

or as an explicit list (TOML, or JSON in `TENFOLD_SHARDS`)::

    [[shards]]
    name = "eu1"
    url = "postgresql://db-eu1/app"
    replicas = ["postgresql://db-eu1-r1/app"]
"""

from __future__ import annotations

import contextvars
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from tenfold.errors import ConfigError
from tenfold.keyspace import SLOTS

__all__ = [
    "DATA_SCHEMES",
    "Settings",
    "ShardSpec",
    "load_settings",
    "redact_url",
]

DATA_SCHEMES = ("sqlite", "postgresql")  # built in; `tenfold.backends.register` adds more
_SCHEME_ALIASES = {"postgres": "postgresql"}
_SHARD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "tenfold_config_file", default=None
)


# "user:password@" anywhere in a text (error messages echo inputs that may hold URLs).
_USERINFO = re.compile(r"([^\s:/@'\"]*):([^\s/@'\"]+)@")


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`, safe to print and log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    # Rebuilt from the raw netloc, not .hostname/.port: those lowercase the host,
    # drop IPv6 brackets, and .port raises on a malformed port.
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


def _hide_passwords(text: str) -> str:
    return _USERINFO.sub(r"\1:***@", text)


def check_data_url(setting: str, url: str) -> str:
    """Validate a shard or catalog URL and normalise `postgres://` to `postgresql://`."""
    from tenfold import backends  # it imports config (redact_url) lazily too

    accepted = ", ".join(f"{s}://" for s in backends.schemes("data"))
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            setting, _hide_passwords(f"{url!r} is not a URL; accepted schemes: {accepted}")
        )
    scheme, rest = url.split("://", 1)
    scheme = _SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
    if not backends.registered("data", f"{scheme}://"):
        raise ConfigError(
            setting,
            f"unknown scheme {scheme + '://'!r} in {redact_url(url)!r}; accepted: {accepted}",
        )
    if scheme == "sqlite" and (not rest.startswith("/") or rest in ("/", "/:memory:")):
        raise ConfigError(
            setting,
            _hide_passwords(
                f"{url!r} names no database file; write sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db"
            ),
        )
    if scheme == "postgresql":
        try:
            port = urlsplit(url).port
        except ValueError as exc:
            raise ConfigError(setting, f"malformed URL {redact_url(url)!r}: {exc}") from None
        del port
    return f"{scheme}://{rest}"


class ShardSpec(BaseModel):
    """One shard: a name, its primary URL and optional read-replica URLs."""

    name: str
    url: str
    replicas: list[str] = []

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SHARD_NAME.match(v):
            raise ConfigError(
                "TENFOLD_SHARDS",
                f"shard name {v!r} must be lowercase letters, digits or _, starting with a letter",
            )
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_data_url("TENFOLD_SHARDS", v)

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v: list[str]) -> list[str]:
        return [check_data_url("TENFOLD_SHARDS (replicas)", u) for u in v]


class Settings(BaseSettings):
    """All of tenfold's settings. Units are in the names; every value is checked at load."""

    model_config = SettingsConfigDict(env_prefix="TENFOLD_", extra="forbid")

    catalog_url: str = "sqlite:///data/catalog.db"
    shard_url: str = "sqlite:///data/shard{n}.db"
    shard_count: int = 4
    shard_replica_urls: list[str] = []
    shards: list[ShardSpec] = []

    pool_min_size: int = 1
    pool_max_size: int = 10
    pool_acquire_timeout_s: float = 10.0
    connect_timeout_s: float = 3.0
    query_timeout_s: float = 30.0
    scatter_timeout_s: float = 10.0
    statement_cache_size: int = 512
    # What a connection's release resets. "transaction": roll back an open
    # transaction only; connections follow PgBouncer's transaction-pooling rule
    # (no session SET, LISTEN, session advisory lock or WITH HOLD cursor left
    # behind), which saves a round trip per checkout. "session": asyncpg's full
    # reset query (RESET ALL, UNLISTEN *, CLOSE ALL, advisory unlock) as well.
    pool_reset: Literal["transaction", "session"] = "transaction"
    topology_ttl_s: float = 5.0
    topology_refresh_wait_s: float = 0.25
    # How long db.transaction_for keeps retrying a write refused because its
    # slot is moving (the switch's write pause), before raising SlotMoved.
    slot_moved_wait_s: float = 10.0
    replica_retry_s: float = 5.0
    # Per shard and per process (docs/resilience.md): at most shard_max_concurrent
    # connections leased at once, callers beyond wait at most shard_max_wait_s
    # (shard_max_waiting of them), and a full shard that freed nothing for
    # shard_stall_after_s is stalled: its waiters leave, new callers are refused.
    # Keep shard_max_concurrent below the admission floor (admission_initial_limit
    # // 8) so a stalled shard cannot hold the whole admission budget.
    # shard_breaker_failures consecutive unavailable/timed-out leases open the
    # shard's breaker for shard_breaker_open_s.
    shard_max_concurrent: int = 4
    shard_max_wait_s: float = 0.5
    shard_max_waiting: int = 64
    shard_stall_after_s: float = 0.25
    shard_breaker_failures: int = 5
    shard_breaker_open_s: float = 1.0
    # /readyz: "any" = ready while the catalog and at least one shard answer
    # (one dead shard must not take every process out of rotation); "all" = every shard.
    readiness_shards: Literal["any", "all"] = "any"
    id_worker_lease_s: float = 60.0
    migrations_dir: Path | None = None

    events_url: str = "memory://"
    events_partitions: int = 16
    events_connect_timeout_s: float = 3.0
    events_publish_timeout_s: float = 5.0
    relay_batch_size: int = 256
    relay_poll_interval_s: float = 0.2
    # While rows keep coming, a relay pass waits this long first so one read
    # and one mark carry several rows (Kafka's linger.ms); an idle outbox's
    # first row goes out at once. 0 turns it off.
    relay_linger_s: float = 0.005
    relay_lease_s: float = 10.0
    outbox_retention_s: float = 3600.0
    consumer_max_attempts: int = 5
    consumer_initial_backoff_s: float = 0.2
    consumer_max_backoff_s: float = 30.0
    handler_timeout_s: float = 30.0

    cache_url: str = "memory://"
    cache_prefix: str = "tenfold"
    limits_url: str = "memory://"
    # name -> rule; the gateway applies a rule only to the routes it names ("on *":
    # every route, "per user" ones to authenticated and "per ip" ones to anonymous
    # requests); a rule naming no route is for the app's own rate_limit() checks.
    rate_limits: dict[str, str] = {
        "ip": "1200/minute burst 200 per ip on *",
        "user": "10000/minute burst 500 per user on *",
    }
    admission_enabled: bool = True
    admission_max_queue: int = 256
    admission_max_wait_s: float = 0.05
    admission_initial_limit: int = 64
    admission_max_limit: int = 1000
    max_body_bytes: int = 64 * 1024
    auth_secret: SecretStr = SecretStr("")
    auth_secret_file: Path = Path("data/auth.secret")
    auth_issuer: str = "tenfold"
    auth_audience: str = "tenfold-app"
    access_ttl_s: float = 900.0
    # Verified tokens claiming a longer life (exp - iat, or exp - now) are refused.
    access_token_max_lifetime_s: float = 3600.0
    refresh_ttl_s: float = 30 * 86400.0
    password_profile: str = "default"
    log_format: str = "json"
    log_level: str = "INFO"
    trace_exporter: str = "none"
    drain_timeout_s: float = 10.0
    # Collector settings applied once the app has started (tenfold.gateway.heap):
    # freeze the start-up heap, and collect the youngest generation every N net
    # allocations instead of CPython's 700. 0 leaves CPython's defaults alone.
    gc_gen0_threshold: int = 20_000
    # realtime hub (/ws): fan-out goes over TENFOLD_EVENTS_URL (in-process or NATS)
    realtime_max_frame_bytes: int = 16 * 1024
    realtime_auth_timeout_s: float = 10.0
    realtime_send_queue: int = 256
    realtime_max_channels: int = 100
    realtime_publish_rate: float = 20.0
    realtime_publish_burst: int = 40
    realtime_max_conns_per_user: int = 20
    realtime_history_size: int = 100
    realtime_history_ttl_s: float = 300.0
    realtime_presence_ttl_s: float = 30.0
    realtime_ping_interval_s: float = 20.0
    # How often each node asks again whether every subscription is still allowed
    # (the bound on access after e.g. a room leave whose revoke signal was lost).
    realtime_reauthorize_interval_s: float = 30.0

    @field_validator("catalog_url")
    @classmethod
    def _catalog(cls, v: str) -> str:
        return check_data_url("TENFOLD_CATALOG_URL", v)

    @field_validator("events_url")
    @classmethod
    def _events(cls, v: str) -> str:
        from tenfold import backends

        return backends.check("events", v)  # ConfigError listing the known schemes

    @field_validator("shard_url")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_data_url("TENFOLD_SHARD_URL", v)

    @field_validator("shard_replica_urls")
    @classmethod
    def _replica_templates(cls, v: list[str]) -> list[str]:
        return [check_data_url("TENFOLD_SHARD_REPLICA_URLS", u) for u in v]

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not 1 <= self.shard_count <= SLOTS:
            raise ConfigError(
                "TENFOLD_SHARD_COUNT", f"must be between 1 and {SLOTS}, got {self.shard_count}"
            )
        if not self.shards and self.shard_count > 1 and "{n}" not in self.shard_url:
            raise ConfigError(
                "TENFOLD_SHARD_URL",
                f"has no {{n}} placeholder but TENFOLD_SHARD_COUNT is {self.shard_count}: "
                "every shard would be the same database",
            )
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise ConfigError("TENFOLD_SHARDS", f"shard names repeat: {names}")
        if len(names) > SLOTS:
            raise ConfigError("TENFOLD_SHARDS", f"at most {SLOTS} shards, got {len(names)}")
        if not 1 <= self.pool_min_size <= self.pool_max_size:
            raise ConfigError(
                "TENFOLD_POOL_MIN_SIZE",
                f"need 1 <= pool_min_size ({self.pool_min_size}) <= pool_max_size "
                f"({self.pool_max_size})",
            )
        for name in (
            "pool_acquire_timeout_s",
            "connect_timeout_s",
            "query_timeout_s",
            "scatter_timeout_s",
            "topology_ttl_s",
            "topology_refresh_wait_s",
            "slot_moved_wait_s",
            "replica_retry_s",
            "shard_max_concurrent",
            "shard_stall_after_s",
            "shard_breaker_failures",
            "shard_breaker_open_s",
            "id_worker_lease_s",
            "events_connect_timeout_s",
            "events_publish_timeout_s",
            "relay_poll_interval_s",
            "relay_lease_s",
            "outbox_retention_s",
            "consumer_initial_backoff_s",
            "consumer_max_backoff_s",
            "handler_timeout_s",
            "realtime_auth_timeout_s",
            "realtime_publish_rate",
            "realtime_history_ttl_s",
            "realtime_presence_ttl_s",
            "realtime_ping_interval_s",
            "realtime_reauthorize_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"TENFOLD_{name.upper()}", f"must be > 0, got {getattr(self, name)}"
                )
        if self.shard_max_wait_s < 0 or self.shard_max_waiting < 0:
            raise ConfigError(
                "TENFOLD_SHARD_MAX_WAIT_S",
                f"shard_max_wait_s ({self.shard_max_wait_s}) and shard_max_waiting "
                f"({self.shard_max_waiting}) must be >= 0",
            )
        if not 0 <= self.relay_linger_s <= 1:
            raise ConfigError("TENFOLD_RELAY_LINGER_S", f"must be 0..1, got {self.relay_linger_s}")
        if self.id_worker_lease_s < 10:
            # Leases are treated as lapsed 2 s early and renewed every third of
            # their length; below 10 s a slow catalog would stop id issuance.
            raise ConfigError(
                "TENFOLD_ID_WORKER_LEASE_S", f"must be >= 10 s, got {self.id_worker_lease_s}"
            )
        for name, low, high in (
            ("events_partitions", 1, 4096),
            ("relay_batch_size", 1, 10_000),
            ("consumer_max_attempts", 1, 1000),
            ("realtime_max_frame_bytes", 64, 16 * 1024 * 1024),
            ("realtime_send_queue", 1, 1_000_000),
            ("realtime_max_channels", 1, 100_000),
            ("realtime_publish_burst", 1, 1_000_000),
            ("realtime_max_conns_per_user", 1, 1_000_000),
            ("realtime_history_size", 1, 1_000_000),
            ("gc_gen0_threshold", 0, 10_000_000),
        ):
            if not low <= getattr(self, name) <= high:
                raise ConfigError(
                    f"TENFOLD_{name.upper()}", f"must be {low}..{high}, got {getattr(self, name)}"
                )
        if self.consumer_initial_backoff_s > self.consumer_max_backoff_s:
            raise ConfigError(
                "TENFOLD_CONSUMER_INITIAL_BACKOFF_S",
                f"{self.consumer_initial_backoff_s} is above TENFOLD_CONSUMER_MAX_BACKOFF_S "
                f"({self.consumer_max_backoff_s})",
            )
        if not self.access_ttl_s <= self.access_token_max_lifetime_s <= 7 * 86400:
            raise ConfigError(
                "TENFOLD_ACCESS_TOKEN_MAX_LIFETIME_S",
                f"must be from TENFOLD_ACCESS_TTL_S ({self.access_ttl_s}) to 604800 s, "
                f"got {self.access_token_max_lifetime_s}",
            )
        if self.statement_cache_size < 0:
            raise ConfigError("TENFOLD_STATEMENT_CACHE_SIZE", "must be >= 0")
        return self

    def shard_specs(self) -> list[ShardSpec]:
        """The shards, from the explicit list or expanded from the template."""
        if self.shards:
            return list(self.shards)
        return [
            ShardSpec(
                name=f"s{n}",
                url=self.shard_url.replace("{n}", str(n)),
                replicas=[u.replace("{n}", str(n)) for u in self.shard_replica_urls],
            )
            for n in range(self.shard_count)
        ]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from arguments, `TENFOLD_*` variables and the TOML file.

    Raises:
        ConfigError: naming the first setting that is wrong and why.
    """
    path = Path(config_file) if config_file else None
    if path is None and os.environ.get("TENFOLD_CONFIG"):
        path = Path(os.environ["TENFOLD_CONFIG"])
    if path is None and Path("tenfold.toml").is_file():
        path = Path("tenfold.toml")
    if path is not None and not path.is_file():
        raise ConfigError("TENFOLD_CONFIG", f"config file {str(path)!r} does not exist")
    token = _config_file.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
        setting = "TENFOLD_" + (loc[0].upper() if loc else "?")
        # The input may be (or contain) a URL with a password: hide it before echoing.
        got = _hide_passwords(repr(first.get("input")))
        raise ConfigError(setting, f"{first['msg']} (got {got:.80})") from None
    except SettingsError as exc:  # e.g. TENFOLD_SHARDS is not valid JSON
        field = re.search(r'field "(\w+)"', str(exc))
        setting = f"TENFOLD_{field.group(1).upper()}" if field else "TENFOLD_*"
        raise ConfigError(setting, f"{exc}; complex values are JSON") from None
    except ValueError as exc:  # malformed TOML
        raise ConfigError("TENFOLD_CONFIG", f"cannot read {path}: {exc}") from None
    finally:
        _config_file.reset(token)
