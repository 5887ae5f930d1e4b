"""The one backend registry: a scheme per capability, one call to add one, one error else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenfold import backends
from tenfold.cache import MemoryL2
from tenfold.cache import from_url as cache_from_url
from tenfold.config import Settings, ShardSpec
from tenfold.data.base import PoolOptions, pool_from_url
from tenfold.data.sqlite import SqlitePool
from tenfold.errors import ConfigError
from tenfold.events import backend_from_url
from tenfold.events.memory import MemoryStreams
from tenfold.limits import MemoryStorage
from tenfold.limits import from_url as limits_from_url
from tenfold.realtime import broker_from_url
from tenfold.realtime.memory import MemoryBroker


class KafkaLikeStreams(MemoryStreams):
    """A stand-in third-party events backend."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.url = url


class OwnL2(MemoryL2):
    pass


class OwnStorage(MemoryStorage):
    pass


class OwnBroker(MemoryBroker):
    pass


class OwnPool(SqlitePool):
    pass


@pytest.fixture
def clean_registry() -> Iterator[None]:
    yield
    for capability, scheme in [
        ("events", "kafka"),
        ("cache", "memcached"),
        ("limits", "dynamo"),
        ("realtime", "ably"),
        ("data", "mydb"),
        ("events", "lazy"),
    ]:
        backends.unregister(capability, scheme)  # type: ignore[arg-type]


def test_built_in_schemes_of_every_capability() -> None:
    assert backends.schemes("data") == ["postgresql", "sqlite"]
    assert backends.schemes("cache") == ["memory", "redis", "rediss"]
    assert backends.schemes("limits") == ["memory", "redis", "rediss"]
    assert backends.schemes("events") == ["memory", "nats", "tls"]
    assert backends.schemes("realtime") == ["memory", "nats", "tls"]
    assert backends.registered("data", "postgres://h/db")  # the alias


@pytest.mark.parametrize(
    ("build", "setting", "capability"),
    [
        (lambda url: cache_from_url(url), "TENFOLD_CACHE_URL", "cache"),
        (lambda url: limits_from_url(url), "TENFOLD_LIMITS_URL", "limits"),
        (lambda url: backend_from_url(url), "TENFOLD_EVENTS_URL", "events"),
        (lambda url: broker_from_url(url), "TENFOLD_EVENTS_URL", "realtime"),
    ],
)
def test_an_unknown_scheme_is_one_config_error_listing_the_known_ones(
    build: Any, setting: str, capability: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build("kafka://user:secret@broker:9092")
    message = str(caught.value)
    assert caught.value.setting == setting
    assert "kafka://user:***@broker:9092" in message and "secret" not in message
    for scheme in backends.schemes(capability):  # type: ignore[arg-type]
        assert f"{scheme}://" in message
    assert f"tenfold.backends.register({capability!r}" in message


def test_unknown_schemes_in_settings_list_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"accepted: postgresql://, sqlite://"):
        Settings(shard_url="mysql://h/app_{n}")
    with pytest.raises(ConfigError, match=r"known events backends: memory://, nats://, tls://"):
        Settings(events_url="kafka://broker:9092")


def test_one_call_registers_a_backend_for_each_capability(clean_registry: None) -> None:
    backends.register("events", "kafka", KafkaLikeStreams)
    backends.register("cache", "memcached", OwnL2)
    backends.register("limits", "dynamo", OwnStorage)
    backends.register("realtime", "ably", OwnBroker)
    events = backend_from_url("kafka://broker:9092")
    assert isinstance(events, KafkaLikeStreams) and events.url == "kafka://broker:9092"
    assert type(cache_from_url("memcached://h")) is OwnL2
    assert type(limits_from_url("dynamo://table")) is OwnStorage
    assert type(broker_from_url("ably://x", connect_timeout_s=1.0)) is OwnBroker
    assert Settings(events_url="kafka://broker:9092").events_url == "kafka://broker:9092"
    assert "kafka" in backends.schemes("events")


def test_a_string_target_is_imported_only_when_used(clean_registry: None) -> None:
    backends.register("events", "lazy", "tenfold_no_such_package.streams:Streams")  # not imported
    with pytest.raises(ConfigError, match=r"lazy:// backend .* cannot be imported"):
        backend_from_url("lazy://x")
    backends.register("events", "lazy", "tenfold.events.memory:MemoryStreams")
    assert isinstance(backend_from_url("lazy://x"), MemoryStreams)
    backends.register("events", "lazy", "tenfold.events.memory:no_such_class")
    with pytest.raises(ConfigError, match="names no class"):
        backend_from_url("lazy://x")


def test_a_registered_data_scheme_is_accepted_and_opens_its_pool(
    clean_registry: None, tmp_path: Path
) -> None:
    backends.register("data", "mydb", "tests.unit.test_backends:OwnPool")
    url = f"mydb:///{tmp_path}/s0.db"
    settings = Settings(
        catalog_url=f"sqlite:///{tmp_path}/cat.db", shards=[ShardSpec(name="s0", url=url)]
    )
    assert settings.shards[0].url == url
    assert type(pool_from_url("s0", url, PoolOptions())) is OwnPool
    backends.unregister("data", "mydb")
    with pytest.raises(ConfigError, match="mydb"):
        Settings(shards=[ShardSpec(name="s0", url=url)])


def test_replacing_a_built_in_and_unregistering_restores_it(clean_registry: None) -> None:
    backends.register("cache", "memory", OwnL2)
    assert type(cache_from_url("memory://")) is OwnL2
    backends.unregister("cache", "memory")
    assert type(cache_from_url("memory://")) is MemoryL2


@pytest.mark.parametrize(
    ("capability", "scheme", "target", "problem"),
    [
        ("queue", "x", "a:B", "unknown capability 'queue'"),
        ("events", "kafka://", "a:B", "not a URL scheme"),
        ("events", "", "a:B", "not a URL scheme"),
        ("events", "kafka", "a.B", "must be 'package.module:Class'"),
        ("events", "kafka", 42, "must be a class"),
    ],
)
def test_bad_registrations_are_config_errors(
    capability: str, scheme: str, target: Any, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        backends.register(capability, scheme, target)  # type: ignore[arg-type]
