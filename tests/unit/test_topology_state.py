"""Stateful check of the topology invariants under any sequence of slot moves.

Invariants (keyspace.py): every slot has exactly one owner; each move bumps the
epoch by exactly one; a move changes the owner of exactly the moved slots; a
stored-and-reloaded topology routes every slot the same way.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tenfold.keyspace import SLOTS, Topology

NAMES = ["a", "b", "c", "d", "e"]


class TopologyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.topology = Topology.balanced(NAMES[:3])
        self.model = [self.topology.shard_of_slot(s) for s in range(SLOTS)]

    @rule(
        first=st.integers(0, SLOTS - 1),
        length=st.integers(1, 300),
        to=st.sampled_from(NAMES),
    )
    def move(self, first: int, length: int, to: str) -> None:
        slots = range(first, min(first + length, SLOTS))
        before = self.topology.epoch
        self.topology = self.topology.with_slots_moved(slots, to)
        for s in slots:
            self.model[s] = to
        assert self.topology.epoch == before + 1

    @rule()
    def reload(self) -> None:
        again = Topology.from_dict(self.topology.to_dict())
        assert again.epoch == self.topology.epoch
        assert all(again.shard_of_slot(s) == self.topology.shard_of_slot(s) for s in range(SLOTS))
        self.topology = again

    @invariant()
    def every_slot_has_the_modelled_owner(self) -> None:
        assert [self.topology.shard_of_slot(s) for s in range(SLOTS)] == self.model

    @invariant()
    def ranges_partition_the_slots(self) -> None:
        covered = [s for r in self.topology.ranges for s in range(r.first, r.last + 1)]
        assert covered == list(range(SLOTS))
        # Adjacent ranges never share an owner: the representation stays minimal.
        for left, right in zip(self.topology.ranges, self.topology.ranges[1:], strict=False):
            assert left.shard != right.shard


TestTopologyMachine = TopologyMachine.TestCase
TestTopologyMachine.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)
