"""Settings: defaults, TENFOLD_* variables, tenfold.toml, validation errors, redact_url."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenfold.config import load_settings, redact_url
from tenfold.errors import ConfigError

ACCEPTED = ("sqlite://", "postgresql://")


def _set(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# --- defaults and sources --------------------------------------------------


def test_defaults_are_the_embedded_mode() -> None:
    s = load_settings()
    assert s.catalog_url == "sqlite:///data/catalog.db"
    specs = s.shard_specs()
    assert [x.name for x in specs] == ["s0", "s1", "s2", "s3"]
    assert [x.url for x in specs] == [f"sqlite:///data/shard{n}.db" for n in range(4)]
    assert all(x.replicas == [] for x in specs)


def test_env_template_and_count(monkeypatch: pytest.MonkeyPatch) -> None:
    _set(
        monkeypatch,
        {
            "TENFOLD_SHARD_URL": "postgresql://u:secret@h/app_{n}",
            "TENFOLD_SHARD_COUNT": "8",
            "TENFOLD_SHARD_REPLICA_URLS": '["postgresql://u:secret@r1/app_{n}"]',
        },
    )
    specs = load_settings().shard_specs()
    assert [x.name for x in specs] == [f"s{n}" for n in range(8)]
    assert [x.url for x in specs] == [f"postgresql://u:secret@h/app_{n}" for n in range(8)]
    assert specs[5].replicas == ["postgresql://u:secret@r1/app_5"]


def test_postgres_scheme_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    _set(
        monkeypatch,
        {
            "TENFOLD_SHARD_URL": "postgres://h/app_{n}",
            "TENFOLD_CATALOG_URL": "POSTGRES://h/cat",
            "TENFOLD_SHARD_COUNT": "2",
        },
    )
    s = load_settings()
    assert s.catalog_url == "postgresql://h/cat"
    assert [x.url for x in s.shard_specs()] == ["postgresql://h/app_0", "postgresql://h/app_1"]


def test_env_explicit_shard_list(monkeypatch: pytest.MonkeyPatch) -> None:
    shards = [
        {"name": "eu1", "url": "postgres://db-eu1/app", "replicas": ["postgres://r1/app"]},
        {"name": "us_2", "url": "sqlite:///data/us2.db"},
    ]
    monkeypatch.setenv("TENFOLD_SHARDS", json.dumps(shards))
    specs = load_settings().shard_specs()
    assert [(x.name, x.url, x.replicas) for x in specs] == [
        ("eu1", "postgresql://db-eu1/app", ["postgresql://r1/app"]),
        ("us_2", "sqlite:///data/us2.db", []),
    ]


TOML = """
catalog_url = "postgresql://toml-host/cat"
shard_url = "postgresql://toml-host/app_{n}"
shard_count = 3
query_timeout_s = 7.5
"""


def test_tenfold_toml_in_cwd_is_read(tmp_path: Path) -> None:
    (tmp_path / "tenfold.toml").write_text(TOML)
    s = load_settings()
    assert s.catalog_url == "postgresql://toml-host/cat"
    assert s.query_timeout_s == 7.5
    assert [x.url for x in s.shard_specs()] == [f"postgresql://toml-host/app_{n}" for n in range(3)]


def test_tenfold_config_points_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tenfold.toml").write_text('catalog_url = "postgresql://cwd/cat"\n')
    other = tmp_path / "conf" / "prod.toml"
    other.parent.mkdir()
    other.write_text(
        '[[shards]]\nname = "eu1"\nurl = "postgresql://eu1/app"\n'
        'replicas = ["postgresql://eu1-r/app"]\n'
    )
    monkeypatch.setenv("TENFOLD_CONFIG", str(other))
    s = load_settings()
    assert s.catalog_url == "sqlite:///data/catalog.db"  # the cwd file is not read
    assert [(x.name, x.url, x.replicas) for x in s.shard_specs()] == [
        ("eu1", "postgresql://eu1/app", ["postgresql://eu1-r/app"])
    ]


def test_env_beats_toml_and_arguments_beat_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tenfold.toml").write_text(TOML)
    monkeypatch.setenv("TENFOLD_SHARD_COUNT", "5")
    monkeypatch.setenv("TENFOLD_QUERY_TIMEOUT_S", "2")
    s = load_settings()
    assert len(s.shard_specs()) == 5
    assert s.query_timeout_s == 2.0
    assert s.catalog_url == "postgresql://toml-host/cat"  # not overridden: from TOML
    assert load_settings(query_timeout_s=9).query_timeout_s == 9.0


def test_missing_config_file_names_tenfold_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_CONFIG", "/nonexistent/tenfold-xyz.toml")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == "TENFOLD_CONFIG"
    assert "TENFOLD_CONFIG" in str(info.value)
    assert "tenfold-xyz.toml" in str(info.value)


def test_malformed_toml_names_tenfold_config(tmp_path: Path) -> None:
    (tmp_path / "tenfold.toml").write_text("shard_count = = 3\n")
    with pytest.raises(ConfigError, match="TENFOLD_CONFIG"):
        load_settings()


# --- bad input -----------------------------------------------------------

BAD = [
    ({"TENFOLD_SHARD_URL": "mysql://h/app_{n}"}, "TENFOLD_SHARD_URL", ["mysql", *ACCEPTED]),
    ({"TENFOLD_CATALOG_URL": "data/catalog.db"}, "TENFOLD_CATALOG_URL", [*ACCEPTED]),
    ({"TENFOLD_CATALOG_URL": "sqlite://"}, "TENFOLD_CATALOG_URL", ["sqlite:///"]),
    ({"TENFOLD_CATALOG_URL": "sqlite:///"}, "TENFOLD_CATALOG_URL", ["sqlite:///"]),
    ({"TENFOLD_CATALOG_URL": "sqlite:///:memory:"}, "TENFOLD_CATALOG_URL", ["sqlite:///"]),
    ({"TENFOLD_SHARD_URL": "sqlite://shard{n}.db"}, "TENFOLD_SHARD_URL", ["sqlite:///"]),
    ({"TENFOLD_SHARD_COUNT": "0"}, "TENFOLD_SHARD_COUNT", ["4096", "0"]),
    ({"TENFOLD_SHARD_COUNT": "5000"}, "TENFOLD_SHARD_COUNT", ["4096", "5000"]),
    ({"TENFOLD_SHARD_COUNT": "abc"}, "TENFOLD_SHARD_COUNT", ["abc"]),
    (
        {"TENFOLD_SHARD_URL": "postgresql://h/app", "TENFOLD_SHARD_COUNT": "2"},
        "TENFOLD_SHARD_URL",
        ["{n}"],
    ),
    (
        {"TENFOLD_POOL_MIN_SIZE": "5", "TENFOLD_POOL_MAX_SIZE": "2"},
        "TENFOLD_POOL_MIN_SIZE",
        ["5", "2"],
    ),
    ({"TENFOLD_POOL_MIN_SIZE": "0"}, "TENFOLD_POOL_MIN_SIZE", ["0"]),
    ({"TENFOLD_STATEMENT_CACHE_SIZE": "-1"}, "TENFOLD_STATEMENT_CACHE_SIZE", [">= 0"]),
    (
        {
            "TENFOLD_SHARDS": json.dumps(
                [{"name": "a", "url": "sqlite:///a.db"}, {"name": "a", "url": "sqlite:///b.db"}]
            )
        },
        "TENFOLD_SHARDS",
        ["'a'"],
    ),
    (
        {"TENFOLD_SHARDS": json.dumps([{"name": "S-1", "url": "sqlite:///a.db"}])},
        "TENFOLD_SHARDS",
        ["S-1"],
    ),
    (
        {"TENFOLD_SHARDS": json.dumps([{"name": "a", "url": "mysql://h/a"}])},
        "TENFOLD_SHARDS",
        ["mysql", *ACCEPTED],
    ),
    ({"TENFOLD_SHARDS": '[{"name": "a", '}, "TENFOLD_SHARDS", ["JSON"]),
    (
        {"TENFOLD_SHARD_REPLICA_URLS": '["redis://h/0"]'},
        "TENFOLD_SHARD_REPLICA_URLS",
        ["redis", *ACCEPTED],
    ),
]
TIMEOUTS = [
    "TENFOLD_POOL_ACQUIRE_TIMEOUT_S",
    "TENFOLD_CONNECT_TIMEOUT_S",
    "TENFOLD_QUERY_TIMEOUT_S",
    "TENFOLD_SCATTER_TIMEOUT_S",
    "TENFOLD_TOPOLOGY_TTL_S",
    "TENFOLD_REPLICA_RETRY_S",
    "TENFOLD_ID_WORKER_LEASE_S",
]
BAD += [({name: "-1"}, name, ["-1"]) for name in TIMEOUTS]
BAD += [({name: "0"}, name, ["> 0"]) for name in TIMEOUTS[:2]]


@pytest.mark.parametrize(("env", "setting", "words"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], setting: str, words: list[str]
) -> None:
    _set(monkeypatch, env)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == setting
    message = str(info.value)
    assert setting in message
    for word in words:
        assert word in message


def test_one_shard_needs_no_placeholder(monkeypatch: pytest.MonkeyPatch) -> None:
    _set(monkeypatch, {"TENFOLD_SHARD_URL": "postgresql://h/app", "TENFOLD_SHARD_COUNT": "1"})
    assert [x.url for x in load_settings().shard_specs()] == ["postgresql://h/app"]


PASSWORD = "Sup3rS3cretPw"
LEAKY = [
    {"TENFOLD_SHARD_URL": f"mysql://admin:{PASSWORD}@db.example.com/app_{{n}}"},
    {"TENFOLD_CATALOG_URL": f"mysql://admin:{PASSWORD}@db.example.com/cat"},
    {"TENFOLD_CATALOG_URL": f"postgresql://admin:{PASSWORD}@db.example.com:notaport/cat"},
    {"TENFOLD_CATALOG_URL": f"mysql://admin:{PASSWORD}@db.example.com:notaport/cat"},
    {"TENFOLD_CATALOG_URL": f"admin:{PASSWORD}@db.example.com/cat"},
    {"TENFOLD_CATALOG_URL": f"postgresql:/admin:{PASSWORD}@db.example.com/cat"},
    {"TENFOLD_SHARD_REPLICA_URLS": json.dumps([f"mysql://admin:{PASSWORD}@r/app"])},
    {"TENFOLD_SHARDS": json.dumps([{"url": f"postgresql://admin:{PASSWORD}@h/app"}])},
    {"TENFOLD_SHARDS": json.dumps([{"name": "a", "url": f"oracle://admin:{PASSWORD}@h/a"}])},
    {
        "TENFOLD_SHARDS": json.dumps(
            [{"name": "a", "url": f"postgresql://admin:{PASSWORD}@h/a", "replicas": 3}]
        )
    },
]


@pytest.mark.parametrize("env", LEAKY, ids=[next(iter(e)) + str(i) for i, e in enumerate(LEAKY)])
def test_config_errors_never_show_a_password(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    _set(monkeypatch, env)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value)
    assert PASSWORD not in info.value.problem
    assert info.value.setting.startswith("TENFOLD_")


# --- redact_url ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "postgresql://app:secret@db.example.com:5433/main?sslmode=require",
            "postgresql://app:***@db.example.com:5433/main?sslmode=require",
        ),
        ("postgresql://app:secret@db/main", "postgresql://app:***@db/main"),
        ("postgresql://:secret@db/main", "postgresql://:***@db/main"),
        ("postgresql://app:secret@[::1]:5432/main", "postgresql://app:***@[::1]:5432/main"),
        ("postgresql://App:secret@DB.Example.COM/Main", "postgresql://App:***@DB.Example.COM/Main"),
        ("postgresql://app:secret@db:notaport/main", "postgresql://app:***@db:notaport/main"),
    ],
)
def test_redact_url_hides_the_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app@db.example.com:5432/main",
        "postgresql://db.example.com/main",
        "sqlite:///data/shard0.db",
        "sqlite:////abs/path/catalog.db",
        "not a url at all",
    ],
)
def test_redact_url_leaves_urls_without_password_unchanged(url: str) -> None:
    assert redact_url(url) == url


lower = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12)


@given(
    user=lower,
    password=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=20),
    host=lower,
    port=st.none() | st.integers(1, 65535),
    path=lower,
)
def test_redact_url_keeps_user_host_port_path(
    user: str, password: str, host: str, port: int | None, path: str
) -> None:
    hostport = host if port is None else f"{host}:{port}"
    url = f"postgresql://{user}:{password}@{hostport}/{path}"
    out = redact_url(url)
    assert password not in out
    parts, orig = urlsplit(out), urlsplit(url)
    assert (parts.scheme, parts.username, parts.hostname, parts.port, parts.path) == (
        orig.scheme,
        orig.username,
        orig.hostname,
        orig.port,
        orig.path,
    )
    assert parts.password == "***"
