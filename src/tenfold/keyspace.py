"""The keyspace: 4096 slots, one slot function, and the topology over them.

Every layer that partitions (shards, event partitions, cache ownership) uses
`slot_of`, so a key lives in the same slot everywhere.

Invariants:
- `slot_of(k)` depends only on the canonical bytes of `k`: the same in every
  process, on every machine and every Python version (xxh3_64 is specified,
  unlike `hash()`).
- A `Topology` maps each of the 4096 slots to exactly one shard; one that
  leaves a slot unowned or owns it twice cannot be constructed.
- Epochs only grow: a topology saved to the catalog has an epoch one above the
  epoch it was derived from (see `tenfold.data.catalog`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from tenfold.errors import KeyspaceError, TopologyError

# A tuple for isinstance, not `bytes | bytearray | memoryview`: that union is
# built again at every call on the hot paths that test for it.
BYTES_LIKE = (bytes, bytearray, memoryview)

__all__ = ["SLOTS", "Key", "SlotRange", "Topology", "canonical_bytes", "slot_of"]

SLOTS = 4096
Key = str | int | bytes | uuid.UUID

_hash = xxhash.xxh3_64_intdigest


def canonical_bytes(key: Key) -> bytes:
    """The byte encoding that `slot_of` hashes.

    A one-byte type tag keeps `"1"`, `1` and `b"1"` apart. Ints are signed
    big-endian in the fewest bytes, so any size of int works.

    Raises:
        TypeError: for `None`, `bool` and any type other than str, int, bytes, UUID.
    """
    kind = type(key)
    if kind is str:
        # surrogatepass: a lone surrogate still has one stable encoding.
        return b"s" + key.encode("utf-8", "surrogatepass")  # type: ignore[union-attr]
    if kind is int:
        n: int = key  # type: ignore[assignment]
        # ~n for negatives: -128 needs 1 byte (0x80), not 2 as n.bit_length() suggests.
        size = ((~n if n < 0 else n).bit_length() + 8) // 8
        return b"i" + n.to_bytes(size, "big", signed=True)
    if kind is bytes:
        return b"b" + key  # type: ignore[operator]
    if isinstance(key, uuid.UUID):
        return b"u" + key.bytes
    # Subclasses (str enums, int flags) are accepted by their base behaviour,
    # but bool is refused: True and 1 would silently share a slot.
    if isinstance(key, bool) or key is None:
        raise TypeError(f"shard key must be str, int, bytes or UUID, got {kind.__name__} ({key!r})")
    if isinstance(key, str):
        return b"s" + str.encode(key, "utf-8", "surrogatepass")
    if isinstance(key, int):
        return canonical_bytes(int(key))
    if isinstance(key, BYTES_LIKE):
        return b"b" + bytes(key)
    raise TypeError(f"shard key must be str, int, bytes or UUID, got {kind.__name__}")


def slot_of(key: Key) -> int:
    """The slot (0..4095) that owns `key`: xxh3_64 of its canonical bytes mod 4096."""
    # The str fast path skips a function call: it is the common key type.
    if type(key) is str:
        try:
            return _hash(b"s" + key.encode()) % SLOTS
        except UnicodeEncodeError:
            pass  # a lone surrogate: the general path encodes it with surrogatepass
    return _hash(canonical_bytes(key)) % SLOTS


@dataclass(frozen=True, slots=True)
class SlotRange:
    """Slots `first`..`last` inclusive, owned by `shard`."""

    first: int
    last: int
    shard: str

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Topology:
    """An immutable map from slot ranges to shard names, at an epoch.

    Build one with `Topology.balanced(names)` or `Topology(epoch, ranges, shards)`;
    the constructor refuses gaps, overlaps and unknown shard names.
    """

    epoch: int
    ranges: tuple[SlotRange, ...]
    shards: tuple[str, ...]
    _owner: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.epoch < 1:
            raise TopologyError(f"topology epoch must be >= 1, got {self.epoch}")
        if len(set(self.shards)) != len(self.shards):
            raise TopologyError(f"topology names a shard twice: {list(self.shards)}")
        known = set(self.shards)
        owner: list[str | None] = [None] * SLOTS
        for r in self.ranges:
            if r.shard not in known:
                raise TopologyError(
                    f"epoch {self.epoch}: slots {r} go to unknown shard {r.shard!r}; "
                    f"known shards: {', '.join(self.shards)}"
                )
            if not 0 <= r.first <= r.last < SLOTS:
                raise TopologyError(
                    f"epoch {self.epoch}: slot range {r.first}-{r.last} is outside 0-{SLOTS - 1}"
                )
            for slot in range(r.first, r.last + 1):
                if owner[slot] is not None:
                    raise TopologyError(
                        f"epoch {self.epoch}: slot {slot} is owned twice "
                        f"(by {owner[slot]} and {r.shard})"
                    )
                owner[slot] = r.shard
        unowned = [s for s, o in enumerate(owner) if o is None]
        if unowned:
            raise TopologyError(
                f"epoch {self.epoch}: {len(unowned)} slot(s) unowned, "
                f"first {_compress(unowned)[:5]}; every slot 0-{SLOTS - 1} needs one shard"
            )
        object.__setattr__(self, "_owner", tuple(owner))
        object.__setattr__(self, "ranges", tuple(sorted(self.ranges, key=lambda r: r.first)))

    @classmethod
    def balanced(cls, shards: Sequence[str], epoch: int = 1) -> Topology:
        """Contiguous ranges whose sizes differ by at most one slot (1..4096 shards)."""
        n = len(shards)
        if not 1 <= n <= SLOTS:
            raise TopologyError(f"shard count must be between 1 and {SLOTS}, got {n}")
        base, extra = divmod(SLOTS, n)
        ranges, first = [], 0
        for i, name in enumerate(shards):
            size = base + (1 if i < extra else 0)
            ranges.append(SlotRange(first, first + size - 1, name))
            first += size
        return cls(epoch, tuple(ranges), tuple(shards))

    def shard_of_slot(self, slot: int) -> str:
        """The shard that owns `slot`."""
        if not 0 <= slot < SLOTS:
            raise KeyspaceError(f"slot {slot} is outside 0-{SLOTS - 1}")
        return self._owner[slot]

    def shard_of(self, key: Key) -> str:
        """The shard that owns `key`."""
        return self._owner[slot_of(key)]

    def slots_of(self, shard: str) -> list[SlotRange]:
        """The ranges `shard` owns, in slot order (empty for a shard with no slots)."""
        return [r for r in self.ranges if r.shard == shard]

    def slot_count(self, shard: str) -> int:
        return sum(r.size for r in self.ranges if r.shard == shard)

    def with_slots_moved(self, slots: Iterable[int], to: str) -> Topology:
        """A new topology, one epoch later, where `slots` belong to shard `to`."""
        owner = list(self._owner)
        for slot in slots:
            self.shard_of_slot(slot)
            owner[slot] = to
        shards = self.shards if to in self.shards else (*self.shards, to)
        return Topology(self.epoch + 1, _ranges_from_owners(owner), shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "shards": list(self.shards),
            "ranges": [[r.first, r.last, r.shard] for r in self.ranges],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        try:
            ranges = tuple(SlotRange(int(a), int(b), str(s)) for a, b, s in data["ranges"])
            return cls(int(data["epoch"]), ranges, tuple(str(s) for s in data["shards"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, TopologyError):
                raise
            # repr(data), not dict(data): garbage that is not a mapping must not raise again here.
            raise TopologyError(f"malformed stored topology ({exc}): {data!r:.200}") from exc


def _ranges_from_owners(owner: Sequence[str]) -> tuple[SlotRange, ...]:
    ranges: list[SlotRange] = []
    start = 0
    for slot in range(1, SLOTS + 1):
        if slot == SLOTS or owner[slot] != owner[start]:
            ranges.append(SlotRange(start, slot - 1, owner[start]))
            start = slot
    return tuple(ranges)


def _compress(slots: list[int]) -> list[str]:
    out: list[str] = []
    start = prev = slots[0]
    for s in [*slots[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return out
