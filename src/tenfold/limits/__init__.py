"""Rate limiting: GCRA over a memory or Redis storage, rules parsed at start-up.

limiter = RateLimiter(
    {"messages": "20/minute per user", "login": "5/s burst 10 per ip"},
    from_url("redis://127.0.0.1:6379/0"),
)
decision = await limiter.check("messages", user_id)
if not decision.allowed:
    return Response(status_code=429, headers=headers(decision))
"""

from __future__ import annotations

from tenfold.limits.admission import AdmissionController, AimdLimit, LimitAlgorithm
from tenfold.limits.base import DecideItem, LimiterStorage, from_url
from tenfold.limits.gcra import Decision, decide
from tenfold.limits.limiter import RateLimiter, header_pairs, headers
from tenfold.limits.memory import MemoryStorage
from tenfold.limits.rules import Rule, parse_rule

__all__ = [
    "AdmissionController",
    "AimdLimit",
    "DecideItem",
    "Decision",
    "LimitAlgorithm",
    "LimiterStorage",
    "MemoryStorage",
    "RateLimiter",
    "Rule",
    "decide",
    "from_url",
    "header_pairs",
    "headers",
    "parse_rule",
]
