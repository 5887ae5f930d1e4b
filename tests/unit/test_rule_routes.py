"""Rate-limit rules apply only to the routes they name (issue 13: arena's per-IP
`register` rule was charged on every anonymous request)."""

from __future__ import annotations

import pytest

from tenfold.errors import ConfigError
from tenfold.gateway.rule_routes import RuleRoutes
from tenfold.limits import parse_rule

RULES = {
    "ip": "1200/minute per ip on *",
    "user": "10000/minute per user on *",
    "register": "600/minute burst 200 per ip on POST /auth/register",
    "join": "30/minute per user on POST /rooms/{room_id}/join",
    "reads": "100/minute per ip on /rooms/{room_id}/messages, GET /leaderboard",
    "login_account": "10/minute per account",  # the app's own check: never the gateway's
}
ROUTES = RuleRoutes({name: parse_rule(text) for name, text in RULES.items()})
IP = "10.0.0.7"


@pytest.mark.parametrize(
    ("method", "path", "user", "expected"),
    [
        ("GET", "/leaderboard", None, [("ip", IP), ("reads", IP)]),
        ("GET", "/wallet", None, [("ip", IP)]),
        ("POST", "/auth/register", None, [("ip", IP), ("register", IP)]),
        # a token does not take a route's per-IP rule away
        ("POST", "/auth/register", "42", [("user", "42"), ("register", IP)]),
        ("GET", "/auth/register", None, [("ip", IP)]),
        ("POST", "/rooms/7/join", "42", [("user", "42"), ("join", "42")]),
        ("POST", "/rooms/7/join", None, [("ip", IP)]),  # per user: anonymous is not counted
        ("POST", "/rooms/7/join/x", "42", [("user", "42")]),
        ("DELETE", "/rooms/7/messages", "42", [("user", "42"), ("reads", IP)]),
        ("POST", "/auth/login", None, [("ip", IP)]),
    ],
)
def test_a_request_counts_only_against_rules_naming_its_route(
    method: str, path: str, user: str | None, expected: list[tuple[str, str]]
) -> None:
    assert ROUTES.checks(method, path, user, IP) == expected


def test_rules_naming_no_route_are_not_the_gateways() -> None:
    assert "login_account" not in ROUTES.names
    assert ROUTES.names == ["ip", "join", "reads", "register", "user"]
    bare = RuleRoutes({"register": parse_rule("600/minute burst 200 per ip")})
    assert bare.checks("GET", "/leaderboard", None, IP) == []


def test_route_clauses_parse_and_bad_ones_are_config_errors() -> None:
    rule = parse_rule("5/s per ip on post /a, /b/{id}")
    assert rule.routes == ("POST /a", "/b/{id}")
    assert parse_rule("5/s per ip on /a, *").routes == ("*",)
    assert parse_rule("5/s per account").routes == ()
    with pytest.raises(ConfigError, match="keys requests only by ip or user"):
        parse_rule("5/s per account on POST /auth/login")
    with pytest.raises(ConfigError, match="route 'auth/login' is not"):
        parse_rule("5/s per ip on auth/login")
