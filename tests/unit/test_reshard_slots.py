"""Slot-range arguments of `tenfold shards move`."""

from __future__ import annotations

import pytest

from tenfold.errors import MoveRefused
from tenfold.reshard import format_ranges, parse_slots, to_ranges


def test_ranges_and_single_slots() -> None:
    assert parse_slots("0-3,10, 7") == [0, 1, 2, 3, 7, 10]
    assert parse_slots("4095") == [4095]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("0-10,5-20", "overlap"),
        ("4096", "outside"),
        ("-1", "not a slot"),
        ("10-2", "reversed"),
        ("a-b", "not a slot"),
        ("", "no slots"),
        ("1,,2", "empty part"),
        ("3,3", "overlap"),
    ],
)
def test_bad_ranges_name_the_problem(text: str, names: str) -> None:
    with pytest.raises(MoveRefused, match=names):
        parse_slots(text)


def test_round_trip_merges_neighbours() -> None:
    slots = [5, 1, 2, 3, 9, 4]
    assert to_ranges(slots) == [(1, 5), (9, 9)]
    assert format_ranges(slots) == "1-5,9"
    assert parse_slots(format_ranges(slots)) == sorted(slots)
