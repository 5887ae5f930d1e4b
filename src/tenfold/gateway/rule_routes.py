"""Which rate-limit rules count a request: the rules that name its route.

routes = RuleRoutes(limiter.rules)
routes.checks("POST", "/auth/login", user=None, ip="10.0.0.7")
# -> [("ip", "10.0.0.7"), ("login_ip", "10.0.0.7")]

A rule `on *` counts every request: `per user` ones count authenticated
requests, `per ip` ones anonymous requests (an authenticated request is
counted against its user instead, so one NAT does not share one budget). A
rule naming routes counts the requests to them: `per ip` always, `per user`
when the request is authenticated. Rules naming no route are not here: the app
checks them itself (`tenfold.gateway.rate_limit`). Matching is by path before
routing (the middleware runs first): a static path is one dict lookup, a
`{name}` segment matches one path segment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tenfold.limits.rules import EVERY_ROUTE, Rule

__all__ = ["RuleRoutes"]

# (method or None for any, rule name, scope)
_Target = tuple[str | None, str, str]


class RuleRoutes:
    """The gateway's view of the rules: see the module docstring.

    Args:
        rules: rule name -> parsed rule (`RateLimiter.rules`).
    """

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self.every_ip: list[str] = []
        self.every_user: list[str] = []
        self.exact: dict[str, list[_Target]] = {}
        self.templated: list[tuple[re.Pattern[str], str | None, str, str]] = []
        for name, rule in rules.items():
            for route in rule.routes:
                if route == EVERY_ROUTE:
                    (self.every_ip if rule.scope == "ip" else self.every_user).append(name)
                    continue
                method, _, path = route.rpartition(" ")
                target = (method or None, name, rule.scope)
                if "{" in path:
                    self.templated.append((_template(path), *target))
                else:
                    self.exact.setdefault(path, []).append(target)

    @property
    def names(self) -> list[str]:
        """Every rule the gateway applies somewhere."""
        named = {name for targets in self.exact.values() for _, name, _ in targets}
        named.update(name for _, _, name, _ in self.templated)
        return sorted({*self.every_ip, *self.every_user, *named})

    def checks(self, method: str, path: str, user: str | None, ip: str) -> list[tuple[str, str]]:
        """The (rule name, subject) pairs one request is counted against, in rule order.

        Args:
            method: the request method.
            path: the request path.
            user: the authenticated subject, or None for an anonymous request.
            ip: the client's address.
        """
        if user is not None:
            out = [(name, user) for name in self.every_user]
        else:
            out = [(name, ip) for name in self.every_ip]
        found = self.exact.get(path)
        if found is not None:
            for want, name, scope in found:
                if want is None or want == method:
                    _add(out, name, scope, user, ip)
        for pattern, want, name, scope in self.templated:
            if (want is None or want == method) and pattern.fullmatch(path):
                _add(out, name, scope, user, ip)
        return out


def _add(out: list[tuple[str, str]], name: str, scope: str, user: str | None, ip: str) -> None:
    if scope == "ip":
        out.append((name, ip))
    elif user is not None:  # a per-user rule says nothing about anonymous callers
        out.append((name, user))


def _template(path: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^/{}]+\})", path)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))
