"""One registry: URL scheme → backend class, for every capability.

Every backend is chosen by the scheme of a URL in `Settings`. This module is
the one table that maps a (capability, scheme) pair to the class that serves
it, for the five pluggable interfaces::

    capability  interface (base.py)                  setting             built-in schemes
    data        tenfold.data.base.Pool               TENFOLD_SHARD_URL   sqlite, postgresql
    cache       tenfold.cache.base.L2Backend         TENFOLD_CACHE_URL   memory, redis, rediss
    limits      tenfold.limits.base.LimiterStorage   TENFOLD_LIMITS_URL  memory, redis, rediss
    events      tenfold.events.base.StreamBackend    TENFOLD_EVENTS_URL  memory, nats, tls
    realtime    tenfold.realtime.base.Broker         TENFOLD_EVENTS_URL  memory, nats, tls

A third-party backend registers with one call, before the runtime is built::

    import tenfold.backends
    tenfold.backends.register("events", "kafka", "tenfold_kafka.streams:KafkaStreams")

Targets are "module:Class" strings imported on first use, so an optional
dependency is needed only when its scheme is configured (a class object works
too). A URL with a scheme nobody registered is a `ConfigError` naming the
setting, the URL (without its password) and every known scheme.

How each capability builds an instance from the class is that capability's
`from_url` (see docs/write-your-own-backend.md): this module only resolves.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal, get_args

from tenfold.errors import ConfigError

__all__ = [
    "Capability",
    "backend_class",
    "check",
    "register",
    "registered",
    "scheme_of",
    "schemes",
    "unregister",
]

Capability = Literal["data", "cache", "limits", "events", "realtime"]
_CAPABILITIES: tuple[str, ...] = get_args(Capability)

# The setting that carries each capability's URL: named in errors.
SETTINGS: dict[str, str] = {
    "data": "TENFOLD_SHARD_URL",
    "cache": "TENFOLD_CACHE_URL",
    "limits": "TENFOLD_LIMITS_URL",
    "events": "TENFOLD_EVENTS_URL",
    "realtime": "TENFOLD_EVENTS_URL",  # realtime rides on the events broker
}

# Schemes that mean another one (kept out of the listing of known schemes).
_ALIASES: dict[str, dict[str, str]] = {"data": {"postgres": "postgresql"}}

_REGISTRY: dict[str, dict[str, str | type]] = {
    "data": {
        "sqlite": "tenfold.data.sqlite:SqlitePool",
        "postgresql": "tenfold.data.postgres:PostgresPool",
    },
    "cache": {
        "memory": "tenfold.cache.memory:MemoryL2",
        "redis": "tenfold.cache.redis:RedisL2",
        "rediss": "tenfold.cache.redis:RedisL2",
    },
    "limits": {
        "memory": "tenfold.limits.memory:MemoryStorage",
        "redis": "tenfold.limits.redis:RedisStorage",
        "rediss": "tenfold.limits.redis:RedisStorage",
    },
    "events": {
        "memory": "tenfold.events.memory:MemoryStreams",
        "nats": "tenfold.events.nats:NatsStreams",
        "tls": "tenfold.events.nats:NatsStreams",
    },
    "realtime": {
        "memory": "tenfold.realtime.memory:MemoryBroker",
        "nats": "tenfold.realtime.nats:NatsBroker",
        "tls": "tenfold.realtime.nats:NatsBroker",
    },
}
_BUILT_IN = {capability: dict(table) for capability, table in _REGISTRY.items()}


def _table(capability: str) -> dict[str, str | type]:
    table = _REGISTRY.get(capability)
    if table is None:
        raise ConfigError(
            "tenfold.backends",
            f"unknown capability {capability!r}; use one of: {', '.join(_CAPABILITIES)}",
        )
    return table


def scheme_of(url: str) -> str:
    """The lower-cased scheme of `url` ("" when it has none)."""
    if not isinstance(url, str) or "://" not in url:
        return ""
    return url.split("://", 1)[0].lower()


def register(capability: Capability, scheme: str, target: str | type) -> None:
    """Make `scheme://` URLs of `capability` open `target`.

    Registering a scheme again replaces it (the last call wins), so an app can
    also swap a built-in backend for its own subclass.

    Args:
        capability: "data", "cache", "limits", "events" or "realtime".
        scheme: the URL scheme, without "://" (letters, digits, "+", "-", ".").
        target: "package.module:Class" (imported on first use) or the class.

    Raises:
        ConfigError: an unknown capability, a malformed scheme or target.
    """
    table = _table(capability)
    scheme = scheme.lower() if isinstance(scheme, str) else scheme
    if (
        not isinstance(scheme, str)
        or not scheme
        or not scheme[0].isalpha()
        or any(not (c.isalnum() or c in "+-.") for c in scheme)
    ):
        raise ConfigError(
            f"tenfold.backends.register({capability!r})",
            f"scheme {scheme!r} is not a URL scheme: give it without '://', e.g. 'kafka'",
        )
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        if not module or not attr:
            raise ConfigError(
                f"tenfold.backends.register({capability!r}, {scheme!r})",
                f"target {target!r} must be 'package.module:Class'",
            )
    elif not isinstance(target, type):
        raise ConfigError(
            f"tenfold.backends.register({capability!r}, {scheme!r})",
            f"target must be a class or 'package.module:Class', got {target!r}",
        )
    table[scheme] = target


def unregister(capability: Capability, scheme: str) -> None:
    """Forget `scheme` for `capability`; a built-in scheme goes back to its built-in backend."""
    table = _table(capability)
    built_in = _BUILT_IN[capability].get(scheme)
    if built_in is None:
        table.pop(scheme, None)
    else:
        table[scheme] = built_in


def schemes(capability: Capability) -> list[str]:
    """The schemes `capability` accepts, sorted (aliases left out)."""
    return sorted(_table(capability))


def registered(capability: Capability, url: str) -> bool:
    """True when `url`'s scheme has a backend for `capability`."""
    scheme = scheme_of(url)
    return _ALIASES.get(capability, {}).get(scheme, scheme) in _table(capability)


def backend_class(capability: Capability, url: str, *, setting: str | None = None) -> Any:
    """The class registered for `url`'s scheme, imported now if given as a string.

    Args:
        capability: which interface the URL configures.
        url: the backend URL; only its scheme is read.
        setting: the setting to name in errors (the capability's by default).

    Raises:
        ConfigError: the scheme is unknown (the message lists the known ones), or
            the registered target cannot be imported.
        MissingDependency: the backend needs an optional extra that is missing.
    """
    scheme, target = _lookup(capability, url, setting)
    where = setting or SETTINGS[capability]
    if isinstance(target, type):
        return target
    module, _, attr = target.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            raise ConfigError(
                where, f"the {scheme}:// backend {target!r} cannot be imported ({exc})"
            ) from exc
        raise  # a dependency of the backend is missing: its own error says which
    cls = getattr(loaded, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(where, f"the {scheme}:// backend {target!r} names no class")
    return cls


def check(capability: Capability, url: str, *, setting: str | None = None) -> str:
    """`url` if its scheme has a backend for `capability`, without importing it.

    Raises:
        ConfigError: the scheme is unknown; the message lists the known ones.
    """
    _lookup(capability, url, setting)
    return url


def _lookup(capability: str, url: str, setting: str | None) -> tuple[str, str | type]:
    table = _table(capability)
    scheme = scheme_of(url)
    scheme = _ALIASES.get(capability, {}).get(scheme, scheme)
    target = table.get(scheme)
    if target is None:
        from tenfold.config import redact_url  # config imports this module lazily too

        known = ", ".join(f"{s}://" for s in sorted(table))
        raise ConfigError(
            setting or SETTINGS[capability],
            f"unknown scheme in {redact_url(str(url))!r}; known {capability} backends: {known} "
            f"(register another with tenfold.backends.register({capability!r}, scheme, "
            "'module:Class'))",
        )
    return scheme, target
