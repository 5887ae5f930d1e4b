"""Rate-limit rule parsing: every accepted form, and clear errors for the rest."""

from __future__ import annotations

import pytest

from tenfold.errors import ConfigError
from tenfold.limits import Rule, parse_rule


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10000/min per user", Rule(10000, 60.0, 10000, "user")),
        ("20/minute per group", Rule(20, 60.0, 20, "group")),
        ("5/s per ip", Rule(5, 1.0, 5, "ip")),
        ("100/hour per route", Rule(100, 3600.0, 100, "route")),
        ("10/s burst 20 per user", Rule(10, 1.0, 20, "user")),
        ("3/sec per ip", Rule(3, 1.0, 3, "ip")),
        ("3/second per ip", Rule(3, 1.0, 3, "ip")),
        ("3/seconds per ip", Rule(3, 1.0, 3, "ip")),
        ("7/m per user", Rule(7, 60.0, 7, "user")),
        ("7/minutes per user", Rule(7, 60.0, 7, "user")),
        ("2/h per user", Rule(2, 3600.0, 2, "user")),
        ("2/hours per user", Rule(2, 3600.0, 2, "user")),
        ("1/d per user", Rule(1, 86400.0, 1, "user")),
        ("1/day per user", Rule(1, 86400.0, 1, "user")),
        ("1/days burst 3 per api_key", Rule(1, 86400.0, 3, "api_key")),
        ("  50 / Min  BURST 5  per  User  ", Rule(50, 60.0, 5, "User")),
    ],
)
def test_good_rules(text: str, expected: Rule) -> None:
    assert parse_rule(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "10/fortnight per user",
        "abc",
        "0/min per user",
        "-5/s per ip",
        "10/s burst 0 per user",
        "10/s burst -1 per user",
        "10/min",
        "10 per user",
        "/min per user",
        "1.5/s per user",
        "10/s burst per user",
        "",
    ],
)
def test_bad_rules_name_the_text_and_the_forms(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rule(text)
    message = str(info.value)
    assert repr(text) in message
    assert "<limit>/<unit> [burst <n>] per <scope>" in message
    assert "minute(s)" in message


def test_unknown_unit_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown unit 'fortnight'"):
        parse_rule("10/fortnight per user")


def test_rule_defaults_and_derived_intervals() -> None:
    rule = Rule(limit=4, period_s=2.0)
    assert rule.burst == 4
    assert rule.scope == "global"
    assert rule.emission_interval_s == 0.5
    assert rule.tolerance_s == 2.0
    assert parse_rule(rule) is rule


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0, "period_s": 1.0},
        {"limit": 1, "period_s": 0.0},
        {"limit": 1, "period_s": 1.0, "burst": -2},
        {"limit": True, "period_s": 1.0},
    ],
)
def test_rule_validates_direct_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Rule(**kwargs)  # type: ignore[arg-type]


def test_limiter_parses_at_construction() -> None:
    from tenfold.limits import MemoryStorage, RateLimiter

    with pytest.raises(ConfigError, match="10/fortnight"):
        RateLimiter({"ok": "1/s per ip", "bad": "10/fortnight per user"}, MemoryStorage())
