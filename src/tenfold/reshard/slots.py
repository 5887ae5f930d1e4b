"""Slot-range arguments: `"0-255,1024"` to a sorted list of slots, and back."""

from __future__ import annotations

from collections.abc import Iterable

from tenfold.errors import MoveRefused
from tenfold.keyspace import SLOTS

__all__ = ["format_ranges", "parse_slots", "to_ranges"]


def parse_slots(text: str) -> list[int]:
    """The slots of `text`: comma-separated slots and inclusive ranges `a-b`.

    Raises:
        MoveRefused: a part is not a slot or range, is outside 0-4095, is
            reversed, or overlaps another part (each names the part).
    """
    parts = [p.strip() for p in str(text).split(",")]
    if not text or not any(parts):
        raise MoveRefused("no slots given: write ranges like 0-255,1024")
    seen: dict[int, str] = {}
    for part in parts:
        if not part:
            raise MoveRefused(f"empty part in slot list {text!r}: write ranges like 0-255,1024")
        first, dash, last = part.partition("-")
        try:
            a = int(first)
            b = int(last) if dash else a
        except ValueError:
            raise MoveRefused(
                f"{part!r} is not a slot or a range of slots (write 17 or 0-255)"
            ) from None
        if not (0 <= a < SLOTS and 0 <= b < SLOTS):
            raise MoveRefused(f"slot range {part} is outside 0-{SLOTS - 1}")
        if a > b:
            raise MoveRefused(f"slot range {part} is reversed: write {b}-{a}")
        for slot in range(a, b + 1):
            if slot in seen:
                raise MoveRefused(f"slot ranges {seen[slot]} and {part} overlap (slot {slot})")
            seen[slot] = part
    return sorted(seen)


def to_ranges(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges of `slots`."""
    out: list[tuple[int, int]] = []
    for slot in sorted(set(slots)):
        if out and out[-1][1] == slot - 1:
            out[-1] = (out[-1][0], slot)
        else:
            out.append((slot, slot))
    return out


def format_ranges(slots: Iterable[int]) -> str:
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in to_ranges(slots))
