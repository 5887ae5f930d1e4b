"""`RateLimiter`: named rules over one storage, and the IETF RateLimit headers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from tenfold.errors import RateLimitError
from tenfold.limits.base import LimiterStorage
from tenfold.limits.gcra import EPSILON_S, Decision
from tenfold.limits.rules import Rule, parse_rule

__all__ = ["RateLimiter", "header_pairs", "headers"]

# What a peek moves a subject's state by (RateLimiter.peek): well inside GCRA's clock slack.
_PEEK_STEP_S = EPSILON_S / 10


class RateLimiter:
    """Check subjects against named rules; rules are parsed here, at start-up.

    Args:
        rules: rule name → rule text (e.g. ``"20/minute per group"``) or `Rule`.
        storage: where the TATs live (`tenfold.limits.from_url(...)`).

    Raises:
        ConfigError: for a rule that does not parse.
    """

    def __init__(self, rules: Mapping[str, str | Rule], storage: LimiterStorage) -> None:
        self.rules: dict[str, Rule] = {name: parse_rule(text) for name, text in rules.items()}
        self.storage = storage

    def rule(self, name: str) -> Rule:
        """The rule called `name`, or `RateLimitError` listing the known ones."""
        try:
            return self.rules[name]
        except KeyError:
            known = ", ".join(sorted(self.rules)) or "none"
            raise RateLimitError(
                f"unknown rate-limit rule {name!r}; known rules: {known}; "
                "add it to the rules the RateLimiter was built with"
            ) from None

    async def check(self, rule_name: str, subject: str, cost: int = 1) -> Decision:
        """Count one request of `subject` against the rule `rule_name`.

        Args:
            rule_name: a name given in `rules`.
            subject: who is limited: a user id, group id, IP or route.
            cost: how many requests this one counts for, 1..the rule's burst.

        Raises:
            RateLimitError: unknown rule, or a cost the rule could never allow.
        """
        rule = self.rule(rule_name)
        if cost != 1:  # every rule's burst is at least 1
            _check_cost(rule_name, rule, cost)
        return await self.storage.decide(f"{rule_name}:{subject}", rule, cost)

    async def peek(self, rule_name: str, subject: str) -> Decision:
        """Whether `subject` has a whole unit request left under `rule_name`, spending ~nothing.

        For rules charged after the fact, such as failed logins per account:
        peek before the work, `check` once it failed. The storage interface
        has one atomic operation, GCRA's decide, so a peek is a decide under a
        rule whose interval T' is `split` times finer and whose tolerance is
        one interval T less (plus T'): it passes exactly when `check` would,
        and moves the subject's state by T' (a tenth of `gcra.EPSILON_S`, the
        algorithm's clock slack), which real time drains at once. As with any
        check-then-charge, attempts in flight together may all pass their
        peeks before one is charged: bound them elsewhere (a bulkhead).
        `remaining` is in whole requests, rounded down.

        Raises:
            RateLimitError: unknown rule.
        """
        rule = self.rule(rule_name)
        split = max(1, math.ceil(rule.emission_interval_s / _PEEK_STEP_S))
        # T' = T / split, T' * burst' = T * (burst - 1) + T': allowed iff tat + T - tolerance <= now
        fine = Rule(
            limit=rule.limit * split,
            period_s=rule.period_s,
            burst=(rule.burst - 1) * split + 1,
            scope=rule.scope,
        )
        found = await self.storage.decide(f"{rule_name}:{subject}", fine, 1)
        return found._replace(remaining=found.remaining // split, limit=rule.limit)

    def check_now(self, rule_name: str, subject: str) -> Decision | None:
        """`check` of a unit request without awaiting, when the storage decides
        in-process (memory); None when it cannot (Redis): then await `check`.

        Raises:
            RateLimitError: unknown rule.
        """
        return self.storage.decide_now(f"{rule_name}:{subject}", self.rule(rule_name))

    async def check_many(self, checks: Sequence[tuple[str, str, int]]) -> list[Decision]:
        """Several (rule_name, subject, cost) checks in one storage batch, in order.

        Args:
            checks: the checks, each a (rule_name, subject, cost) tuple.
        """
        items = []
        for rule_name, subject, cost in checks:
            rule = self.rule(rule_name)
            _check_cost(rule_name, rule, cost)
            items.append((f"{rule_name}:{subject}", rule, cost))
        return await self.storage.decide_many(items)

    @staticmethod
    def headers(decision: Decision) -> dict[str, str]:
        """The response headers for `decision`; see `tenfold.limits.headers`."""
        return headers(decision)


def headers(decision: Decision) -> dict[str, str]:
    """IETF RateLimit headers, plus `Retry-After` when denied.

    `RateLimit-Reset` and `Retry-After` are whole seconds, rounded up, so a
    client that waits that long is not refused for being early.

    Args:
        decision: the decision to describe.
    """
    return {name: str(value) for name, value in _header_values(decision)}


def header_pairs(decision: Decision) -> list[tuple[bytes, bytes]]:
    """`headers(decision)` as ASGI header pairs (lower-case names), for every answer."""
    return [(_ASGI_NAMES[name], b"%d" % value) for name, value in _header_values(decision)]


_ASGI_NAMES = {
    name: name.lower().encode()
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After")
}


def _header_values(decision: Decision) -> list[tuple[str, int]]:
    out = [
        ("RateLimit-Limit", decision.limit),
        ("RateLimit-Remaining", max(0, decision.remaining)),
        ("RateLimit-Reset", max(0, math.ceil(decision.reset_after_s))),
    ]
    if not decision.allowed:
        out.append(("Retry-After", max(1, math.ceil(decision.retry_after_s))))
    return out


def _check_cost(rule_name: str, rule: Rule, cost: int) -> None:
    if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= rule.burst:
        raise RateLimitError(
            f"cost {cost!r} for rate-limit rule {rule_name!r} is impossible: it must be a "
            f"whole number from 1 to the rule's burst ({rule.burst})"
        )
