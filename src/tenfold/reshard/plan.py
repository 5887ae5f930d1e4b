"""The rebalancing planner: which slot ranges to move where (`tenfold shards plan`).

`plan_moves` is a pure function of the topology, the registered shards and
per-slot statistics (`tenfold.reshard.stats`): it reads nothing and changes
nothing, and the same inputs always give the same plan.

How it balances: every shard of the target set should carry an equal share of
the chosen weight (rows, bytes, write load, or with `even` the slot count);
shards outside the target set (`to` smaller than the shard count) give all
their slots away. An overloaded shard gives slots from the tail of its ranges,
highest slot first, so each move is one contiguous range where it can be; a
shard within `tolerance` of its share is left alone, so a balanced cluster
plans no moves. Receivers are filled largest deficit first (ties in topology
order), so 4 -> 8 shards sends the upper half of s0's range to s4, of s1's to
s5, and so on. A slot is never planned to move to its owner.

When the chosen weight is zero everywhere (an empty cluster), it balances slot
counts instead and says so in `Plan.by`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from tenfold.errors import MoveRefused
from tenfold.keyspace import SLOTS, Topology
from tenfold.reshard.slots import format_ranges
from tenfold.reshard.stats import SlotStats

__all__ = [
    "BY",
    "PlannedMove",
    "plan_basis",
    "plan_moves",
    "shard_weights",
    "target_shards",
    "with_copy_time",
]

BY = ("rows", "bytes", "load")


@dataclass(frozen=True)
class PlannedMove:
    """One planned move: `slots` of `source` to `target`, and what it carries."""

    source: str
    target: str
    slots: tuple[int, ...]
    rows: int
    bytes: int
    weight: float
    copy_s: float | None = None

    @property
    def ranges(self) -> str:
        return format_ranges(self.slots)

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "target": self.target,
            "slots": self.ranges,
            "slot_count": len(self.slots),
            "rows": self.rows,
            "bytes": self.bytes,
            "weight": self.weight,
            "copy_s": None if self.copy_s is None else round(self.copy_s, 3),
        }


def target_shards(topology: Topology, shards: Sequence[str], to: int | None) -> list[str]:
    """The shards a plan balances over: all of the topology's, or its first `to`.

    Raises:
        MoveRefused: `to` is below 1, or more shards are asked for than registered.
    """
    listed = list(topology.shards)
    if to is None:
        to = len(listed)
    if to < 1:
        raise MoveRefused(f"--to {to}: a cluster needs at least 1 shard")
    if to > len(listed):
        missing = to - len(listed)
        raise MoveRefused(
            f"--to {to} needs {to} shards but only {len(listed)} are registered "
            f"({', '.join(listed)}): register {missing} more with "
            "`tenfold shards add NAME URL`, then plan again"
        )
    unknown = [n for n in listed[:to] if n not in shards]
    if unknown:
        raise MoveRefused(
            f"shard(s) {', '.join(unknown)} are in the topology but not registered here: "
            "check the configuration (TENFOLD_SHARDS) or `tenfold shards add` them"
        )
    return listed[:to]


def _weights(stats: SlotStats, by: str, even: bool) -> tuple[list[float], str]:
    if even:
        return [1.0] * SLOTS, "slots"
    if by not in BY:
        raise MoveRefused(f"--by {by}: choose rows, bytes or load")
    chosen = stats.of(by)
    weights = [float(chosen.get(s, 0)) for s in range(SLOTS)]
    if sum(weights) <= 0:
        return [1.0] * SLOTS, "slots"  # nothing to weigh: balance slot counts instead
    return weights, by


def shard_weights(
    topology: Topology, weights: Mapping[int, float] | Sequence[float], moves: Sequence[PlannedMove]
) -> dict[str, float]:
    """Each shard's total weight after `moves` (before them when `moves` is empty)."""
    owner = [topology.shard_of_slot(s) for s in range(SLOTS)]
    for m in moves:
        for s in m.slots:
            owner[s] = m.target
    out = {n: 0.0 for n in topology.shards}
    for slot in range(SLOTS):
        out[owner[slot]] += float(weights[slot])
    return out


def plan_moves(
    topology: Topology,
    shards: Sequence[str],
    weights: SlotStats,
    *,
    to: int | None = None,
    even: bool = False,
    by: str = "rows",
    tolerance: float = 0.05,
    frozen: Collection[int] = (),
) -> list[PlannedMove]:
    """The moves that balance `by` ("rows", "bytes", "load"; `even`: slot counts) over the
    first `to` shards of `topology.shards` (all when None). `shards` are the registered
    shard names; `weights` the per-slot statistics; `frozen` slots never move (those an
    unfinished move holds: they stay with their owner). Pure and deterministic.

    Raises:
        MoveRefused: a bad `to` or `by` (the message says what to do).
    """
    targets = target_shards(topology, shards, to)
    pinned = set(frozen)
    w, _ = _weights(weights, by, even)
    total = sum(w)
    share = total / len(targets)
    slack = tolerance * share
    owned: dict[str, list[int]] = {n: [] for n in topology.shards}
    for slot in range(SLOTS):
        owned[topology.shard_of_slot(slot)].append(slot)
    load = {n: sum(w[s] for s in owned[n]) for n in topology.shards}
    ideal = {n: (share if n in targets else 0.0) for n in topology.shards}
    order = {n: i for i, n in enumerate(topology.shards)}

    def excess(n: str) -> float:
        return load[n] - ideal[n]

    def deficit(n: str) -> float:
        return ideal[n] - load[n]

    # Shards leaving the set give everything (even slots of weight 0); others their excess.
    donors = [n for n in topology.shards if n not in targets and owned[n]]
    donors += sorted(
        (n for n in topology.shards if n in targets and excess(n) > slack),
        key=lambda n: (-excess(n), order[n]),
    )
    planned: dict[tuple[str, str], list[int]] = {}
    for donor in donors:
        leaving = donor not in targets
        tail = sorted((s for s in owned[donor] if s not in pinned), reverse=True)
        while tail and (leaving or excess(donor) > slack):
            receivers = sorted(
                (n for n in targets if n != donor and deficit(n) > 0),
                key=lambda n: (-deficit(n), order[n]),
            )
            if not receivers:
                break
            receiver = receivers[0]
            if not leaving and deficit(receiver) <= slack:
                break
            need = deficit(receiver) if leaving else min(excess(donor), deficit(receiver))
            taken: list[int] = []
            got = 0.0
            while tail and got < need:
                slot = tail[0]
                if got + w[slot] / 2 >= need and (taken or not leaving):
                    break  # taking it would overshoot by more than it helps
                taken.append(tail.pop(0))
                got += w[slot]
            if leaving and len(receivers) == 1:
                # The last receiver with room takes the rest of a leaving shard.
                taken += tail
                got += sum(w[s] for s in tail)
                tail = []
            if not taken:
                break  # the next slot alone outweighs what is missing: stop here
            load[donor] -= got
            load[receiver] += got
            planned.setdefault((donor, receiver), []).extend(taken)
        if leaving and tail:
            # Every receiver is full (rounding): the lightest target takes the rest.
            receiver = min(targets, key=lambda n: (load[n], order[n]))
            load[receiver] += sum(w[s] for s in tail)
            planned.setdefault((donor, receiver), []).extend(tail)
    out = []
    for (source, target), slots in planned.items():
        ordered = tuple(sorted(slots))
        out.append(
            PlannedMove(
                source,
                target,
                ordered,
                sum(int(weights.rows.get(s, 0)) for s in ordered),
                sum(int(weights.bytes.get(s, 0)) for s in ordered),
                round(sum(w[s] for s in ordered), 3),
            )
        )
    return sorted(out, key=lambda m: (order[m.source], m.slots[0]))


def plan_basis(weights: SlotStats, by: str, even: bool) -> str:
    """What a plan balanced: "slots" when `even` or when every weight is zero, else `by`."""
    return _weights(weights, by, even)[1]


def with_copy_time(moves: Sequence[PlannedMove], rows_s: float | None) -> list[PlannedMove]:
    """`moves` with `copy_s = rows / rows_s` (0 for no rows; None without a speed)."""
    out = []
    for m in moves:
        copy_s = 0.0 if not m.rows else (m.rows / rows_s if rows_s else None)
        out.append(replace(m, copy_s=copy_s))
    return out
