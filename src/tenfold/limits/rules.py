"""Rate-limit rules: "10000/min per user", "10/s burst 20 per ip on POST /auth/login" → a `Rule`.

Rules are parsed once, when a `RateLimiter` is built (start-up), so a typo
fails the deploy instead of the first request.

A rule applies only to the routes it names. `on *` names every route; `on
POST /auth/login, /rooms/{id}/join` names those (a method is optional, a
`{name}` segment matches one path segment). The gateway counts each request
against the rules that name its route, keyed by the client's IP (`per ip`) or
the authenticated user (`per user`). A rule that names no route is never
applied by the gateway: the app checks it where it means to, with
`rate_limit(request, name, subject)`. (The gateway once took every `per ip`
rule for a rule of every anonymous request, so arena's sign-up limit was
charged on every anonymous page view.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tenfold.errors import ConfigError

__all__ = ["ACCEPTED_FORMS", "EVERY_ROUTE", "GATEWAY_SCOPES", "PERIODS_S", "Rule", "parse_rule"]

EVERY_ROUTE = "*"
# What the gateway can key a request by; rules of other scopes are the app's to check.
GATEWAY_SCOPES = frozenset({"ip", "user"})

PERIODS_S: dict[str, float] = {
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}

ACCEPTED_FORMS = (
    "'<limit>/<unit> [burst <n>] per <scope> [on <routes>]' with limit and burst whole "
    "numbers >= 1, unit one of s, sec, second(s), m, min, minute(s), h, hour(s), d, day(s), "
    "and routes '*' or a comma-separated list of '[METHOD] /path' (scope ip or user); "
    "e.g. '10000/min per user on *', '10/s burst 20 per ip on POST /auth/login' or "
    "'5/min per account' (checked by the app)"
)

_RULE = re.compile(
    r"""^\s*(?P<limit>[+-]?\d+)\s*/\s*(?P<unit>[A-Za-z]+)
        (?:\s+burst\s+(?P<burst>[+-]?\d+))?
        \s+per\s+(?P<scope>[A-Za-z_][A-Za-z0-9_.-]*)
        (?:\s+on\s+(?P<routes>\S.*?))?\s*$""",
    re.VERBOSE | re.IGNORECASE,
)
_ROUTE = re.compile(r"^(?:(?P<method>[A-Za-z]+)\s+)?(?P<path>/\S*)$")


@dataclass(frozen=True, slots=True)
class Rule:
    """`limit` requests per `period_s` seconds for each subject of `scope`.

    `burst` is how many requests may arrive at once from a full bucket; it
    defaults to `limit`. The sustained rate is always `limit / period_s`.
    `routes` are the routes the gateway applies it to, each "METHOD /path",
    "/path" (any method) or "*" (every route); empty: only the app checks it.
    """

    limit: int
    period_s: float
    burst: int = 0
    scope: str = "global"
    routes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigError(
                "rate-limit rule", f"limit must be a whole number >= 1, got {self.limit!r}"
            )
        if not self.period_s > 0:
            raise ConfigError("rate-limit rule", f"period_s must be > 0, got {self.period_s!r}")
        if self.burst == 0:
            object.__setattr__(self, "burst", self.limit)
        elif isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ConfigError(
                "rate-limit rule", f"burst must be a whole number >= 1, got {self.burst!r}"
            )
        if self.routes and self.scope not in GATEWAY_SCOPES:
            raise ConfigError(
                "rate-limit rule",
                f"names routes but is 'per {self.scope}'; the gateway keys requests only by "
                "ip or user: check other scopes in the route with rate_limit(request, ...)",
            )

    @property
    def emission_interval_s(self) -> float:
        """T: the steady spacing between requests, `period_s / limit`."""
        return self.period_s / self.limit

    @property
    def tolerance_s(self) -> float:
        """How far ahead of now the theoretical arrival time may run: `T * burst`."""
        return self.emission_interval_s * self.burst


def parse_rule(text: str | Rule) -> Rule:
    """Parse one rule, e.g. ``"100/hour per route"``; a `Rule` is returned as is.

    Args:
        text: the rule as written in configuration, or an already built `Rule`.

    Raises:
        ConfigError: naming the rule text and the accepted forms.
    """
    if isinstance(text, Rule):
        return text
    match = _RULE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"rate-limit rule {text!r}", f"not understood; write {ACCEPTED_FORMS}")
    unit = match["unit"].lower()
    period_s = PERIODS_S.get(unit)
    if period_s is None:
        raise ConfigError(
            f"rate-limit rule {text!r}", f"unknown unit {unit!r}; write {ACCEPTED_FORMS}"
        )
    limit = int(match["limit"])
    burst = int(match["burst"]) if match["burst"] is not None else limit
    if limit < 1 or burst < 1:
        raise ConfigError(
            f"rate-limit rule {text!r}", f"limit and burst must be >= 1; write {ACCEPTED_FORMS}"
        )
    routes = _routes(text, match["routes"]) if match["routes"] else ()
    try:
        return Rule(
            limit=limit, period_s=period_s, burst=burst, scope=match["scope"], routes=routes
        )
    except ConfigError as exc:
        raise ConfigError(f"rate-limit rule {text!r}", exc.problem) from None


def _routes(text: str, spec: str) -> tuple[str, ...]:
    """'POST /a, /b/{id}' -> ('POST /a', '/b/{id}'); '*' -> ('*',)."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part == EVERY_ROUTE:
            return (EVERY_ROUTE,)  # it covers the others: counting twice would halve the rule
        match = _ROUTE.match(part)
        if match is None:
            raise ConfigError(
                f"rate-limit rule {text!r}",
                f"route {part!r} is not '*', '/path' or 'METHOD /path'; write {ACCEPTED_FORMS}",
            )
        method = match["method"]
        out.append(f"{method.upper()} {match['path']}" if method else match["path"])
    return tuple(out)
