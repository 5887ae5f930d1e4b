"""GCRA: table-driven cases on a fake clock, and Hypothesis checks of its invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenfold.errors import RateLimitError
from tenfold.limits import Decision, MemoryStorage, RateLimiter, Rule, decide, header_pairs, headers
from tenfold.limits.gcra import EPSILON_S

FIVE_PER_S = Rule(limit=5, period_s=1.0)  # T = 0.2 s, burst 5
TWO_PER_S_BURST_4 = Rule(limit=2, period_s=1.0, burst=4)  # T = 0.5 s


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# (rule, [(time offset, cost, allowed, remaining, retry_after_s)])
CASES = {
    "burst of five then refused": (
        FIVE_PER_S,
        [
            (0.0, 1, True, 4, 0.0),
            (0.0, 1, True, 3, 0.0),
            (0.0, 1, True, 2, 0.0),
            (0.0, 1, True, 1, 0.0),
            (0.0, 1, True, 0, 0.0),
            (0.0, 1, False, 0, 0.2),
            (0.1, 1, False, 0, 0.1),
            (0.2, 1, True, 0, 0.0),
        ],
    ),
    "full refill after one period": (
        FIVE_PER_S,
        [(0.0, 5, True, 0, 0.0), (1.0, 5, True, 0, 0.0), (1.0, 1, False, 0, 0.2)],
    ),
    "cost counts as several requests": (
        FIVE_PER_S,
        [(0.0, 3, True, 2, 0.0), (0.0, 3, False, 2, 0.2), (0.0, 2, True, 0, 0.0)],
    ),
    "burst larger than limit": (
        TWO_PER_S_BURST_4,
        [
            (0.0, 1, True, 3, 0.0),
            (0.0, 3, True, 0, 0.0),
            (0.0, 1, False, 0, 0.5),
            (0.5, 1, True, 0, 0.0),
            (2.5, 1, True, 3, 0.0),
        ],
    ),
    "partial refill": (
        FIVE_PER_S,
        [(0.0, 5, True, 0, 0.0), (0.45, 1, True, 1, 0.0), (0.45, 1, True, 0, 0.0)],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_table(name: str) -> None:
    rule, steps = CASES[name]
    tat: float | None = None
    start = 1000.0
    for offset, cost, allowed, remaining, retry_after in steps:
        before = tat
        tat, decision = decide(tat, start + offset, rule, cost)
        assert decision.allowed is allowed, (name, offset)
        assert decision.remaining == remaining, (name, offset, decision)
        assert decision.retry_after_s == pytest.approx(retry_after, abs=1e-9)
        assert decision.limit == rule.limit
        if not allowed:
            assert tat == before  # a refusal costs nothing


def test_reset_after_is_time_to_full_bucket() -> None:
    tat, d = decide(None, 10.0, FIVE_PER_S, 3)
    assert d.reset_after_s == pytest.approx(0.6)
    _, d = decide(tat, 10.1, FIVE_PER_S)
    assert d.reset_after_s == pytest.approx(0.7)


times = st.lists(st.floats(min_value=0.0, max_value=20.0, allow_nan=False), max_size=120).map(
    sorted
)
rules = st.builds(
    Rule,
    limit=st.integers(1, 50),
    period_s=st.sampled_from([0.1, 1.0, 2.5, 60.0]),
    burst=st.integers(1, 60),
)


@settings(max_examples=200, deadline=None)
@given(rule=rules, at=times, costs=st.lists(st.integers(1, 3), min_size=120, max_size=120))
def test_no_window_exceeds_rate_plus_burst(rule: Rule, at: list[float], costs: list[int]) -> None:
    tat: float | None = None
    allowed: list[tuple[float, int]] = []
    for now, cost in zip(at, costs, strict=False):
        cost = min(cost, rule.burst)
        tat, d = decide(tat, now, rule, cost)
        if d.allowed:
            allowed.append((now, cost))
    interval = rule.emission_interval_s
    for i, (start, _) in enumerate(allowed):
        spent = 0
        for end, cost in allowed[i:]:
            spent += cost
            window = end - start
            bound = rule.limit * window / rule.period_s + rule.burst
            assert spent <= bound + EPSILON_S / interval + 1e-9, (start, end, spent, bound)


@settings(max_examples=200, deadline=None)
@given(
    rule=rules,
    start=st.floats(min_value=0.0, max_value=2e9, allow_nan=False),
    n=st.integers(1, 300),
    prior=st.integers(0, 60),
)
def test_steady_client_at_the_rate_is_never_refused(
    rule: Rule, start: float, n: int, prior: int
) -> None:
    # `prior` requests at once first (within the burst), then one every T.
    tat: float | None = None
    for _ in range(min(prior, rule.burst - 1)):
        tat, _ = decide(tat, start, rule)
    interval = rule.period_s / rule.limit
    for i in range(1, n + 1):
        tat, d = decide(tat, start + i * interval, rule)
        assert d.allowed, (i, d)


@settings(max_examples=300, deadline=None)
@given(rule=rules, at=times, costs=st.lists(st.integers(1, 60), min_size=120, max_size=120))
def test_remaining_and_retry_after_are_consistent(
    rule: Rule, at: list[float], costs: list[int]
) -> None:
    tat: float | None = None
    for now, cost in zip(at, costs, strict=False):
        tat, d = decide(tat, now, rule, min(cost, rule.burst))
        assert d.remaining >= 0
        assert (d.retry_after_s > 0) == (not d.allowed)
        assert d.reset_after_s >= 0
        assert tat is None or tat <= now + rule.tolerance_s + EPSILON_S


# The limiter and its headers, over the memory storage and a fake clock.


async def test_limiter_checks_per_subject_and_rule() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        {"msg": "2/s per user", "login": "1/min per ip"}, MemoryStorage(clock=clock)
    )
    assert [(await limiter.check("msg", "u1")).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.check("msg", "u2")).allowed
    assert (await limiter.check("login", "u1")).allowed
    clock.now += 0.5
    assert (await limiter.check("msg", "u1")).allowed
    batch = await limiter.check_many([("login", "ip1", 1), ("login", "ip1", 1)])
    assert [d.allowed for d in batch] == [True, False]


async def test_limiter_rejects_unknown_rule_and_impossible_cost() -> None:
    limiter = RateLimiter({"msg": "2/s per user"}, MemoryStorage())
    with pytest.raises(RateLimitError, match="unknown rate-limit rule 'nope'; known rules: msg"):
        await limiter.check("nope", "u1")
    for cost in (0, 3, -1):
        with pytest.raises(RateLimitError, match="from 1 to the rule's burst"):
            await limiter.check("msg", "u1", cost)


def test_headers() -> None:
    ok = Decision(allowed=True, remaining=3, retry_after_s=0.0, reset_after_s=1.2, limit=10)
    assert headers(ok) == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "3",
        "RateLimit-Reset": "2",
    }
    no = Decision(allowed=False, remaining=0, retry_after_s=0.01, reset_after_s=4.0, limit=10)
    assert headers(no) == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "4",
        "Retry-After": "1",
    }
    later = Decision(allowed=False, remaining=0, retry_after_s=2.0001, reset_after_s=5.0, limit=10)
    assert RateLimiter.headers(later)["Retry-After"] == str(math.ceil(2.0001))


def test_header_pairs_are_the_headers_as_asgi_bytes() -> None:
    ok = Decision(allowed=True, remaining=-2, retry_after_s=0.0, reset_after_s=1.2, limit=10)
    assert header_pairs(ok) == [
        (b"ratelimit-limit", b"10"),
        (b"ratelimit-remaining", b"0"),
        (b"ratelimit-reset", b"2"),
    ]
    for decision in (
        ok,
        Decision(allowed=False, remaining=0, retry_after_s=2.0001, reset_after_s=5.0, limit=10),
    ):
        as_text = {k.decode(): v.decode() for k, v in header_pairs(decision)}
        assert as_text == {k.lower(): v for k, v in headers(decision).items()}


def test_memory_storage_is_bounded_lru_and_drops_expired_first() -> None:
    clock = FakeClock()
    store = MemoryStorage(max_keys=3, clock=clock)
    slow = Rule(limit=1, period_s=100.0)
    fast = Rule(limit=10, period_s=1.0)
    store.decide_now("a", slow)
    store.decide_now("b", fast)  # expires after 0.1 s
    store.decide_now("c", slow)
    clock.now += 1.0
    store.decide_now("d", slow)  # full: drops the expired "b", keeps "a"
    assert len(store) == 3 and store.evicted_live == 0
    assert not store.decide_now("a", slow).allowed  # "a" was kept, and touched (most recent)
    store.decide_now("e", slow)  # full, nothing expired: evicts the LRU live key, "c"
    assert store.evicted_live == 1
    assert store.decide_now("c", slow).allowed
    assert not store.decide_now("a", slow).allowed
    clock.now += 1000.0
    assert store.purge_expired() == 3
    assert len(store) == 0
