"""`Backoff`: capped, jittered, reset by success, validated at construction."""

from __future__ import annotations

import pytest

from tenfold.errors import ConfigError
from tenfold.resilience import Backoff


def test_delays_grow_to_the_cap_and_stay_in_the_upper_half() -> None:
    low = Backoff(0.1, 1.0, rand=lambda: 0.0)
    high = Backoff(0.1, 1.0, rand=lambda: 0.999999)
    lows = [low.next_s() for _ in range(8)]
    highs = [high.next_s() for _ in range(8)]
    assert lows == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5])
    assert highs == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0], rel=1e-5)
    assert all(d > 0 for d in lows)  # never a zero wait: a loop cannot spin


def test_reset_starts_over_and_huge_failure_counts_do_not_overflow() -> None:
    backoff = Backoff(0.2, 3.0, rand=lambda: 1.0)
    for _ in range(5000):
        assert backoff.next_s() <= 3.0
    backoff.reset()
    assert backoff.next_s() == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("args", "what"),
    [((0.0, 1.0), "initial_s"), ((1.0, 0.5), "max_s"), ((0.1, float("inf")), "max_s")],
)
def test_bad_settings_name_themselves(args: tuple[float, float], what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        Backoff(*args)
