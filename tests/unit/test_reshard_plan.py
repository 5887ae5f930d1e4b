"""The planner: pure, deterministic, balanced clusters plan nothing, tails move first."""

from __future__ import annotations

import pytest

from tenfold.errors import MoveRefused
from tenfold.keyspace import SLOTS, SlotRange, Topology
from tenfold.reshard.plan import plan_basis, plan_moves, shard_weights, with_copy_time
from tenfold.reshard.stats import SlotStats


def _grown(n: int, added: int) -> Topology:
    """`n` balanced shards plus `added` empty ones listed after them."""
    base = Topology.balanced([f"s{i}" for i in range(n)])
    names = (*base.shards, *(f"s{n + i}" for i in range(added)))
    return Topology(base.epoch + 1, base.ranges, names)


def _uniform(rows_per_slot: int = 10) -> SlotStats:
    return SlotStats(
        rows={s: rows_per_slot for s in range(SLOTS)},
        bytes={s: rows_per_slot * 100 for s in range(SLOTS)},
        load={s: 1 for s in range(SLOTS)},
    )


def test_balanced_cluster_plans_no_moves() -> None:
    topo = Topology.balanced(["s0", "s1", "s2", "s3"])
    for by in ("rows", "bytes", "load"):
        assert plan_moves(topo, topo.shards, _uniform(), by=by) == []
    assert plan_moves(topo, topo.shards, _uniform(), even=True) == []
    # Small noise (under the 5% tolerance) is left alone too.
    noisy = SlotStats(rows={s: 10 + (s % 3) for s in range(SLOTS)})
    assert plan_moves(topo, topo.shards, noisy) == []


def test_four_to_eight_splits_each_shard_in_half_from_its_tail() -> None:
    topo = _grown(4, 4)
    moves = plan_moves(topo, topo.shards, _uniform(), to=8)
    got = [(m.source, m.target, m.ranges, m.rows, m.bytes) for m in moves]
    assert got == [
        ("s0", "s4", "512-1023", 5120, 512_000),
        ("s1", "s5", "1536-2047", 5120, 512_000),
        ("s2", "s6", "2560-3071", 5120, 512_000),
        ("s3", "s7", "3584-4095", 5120, 512_000),
    ]
    after = shard_weights(topo, [1.0] * SLOTS, moves)
    assert set(after.values()) == {512.0}
    # --even gives the same split; and the same inputs give the same plan.
    evenly = plan_moves(topo, topo.shards, SlotStats(), to=8, even=True)
    assert [(m.source, m.target, m.slots) for m in evenly] == [
        (m.source, m.target, m.slots) for m in moves
    ]
    assert plan_moves(topo, topo.shards, _uniform(), to=8) == moves
    # No --to: the topology's shard list (with the empty added shards) is the target.
    assert plan_moves(topo, topo.shards, _uniform()) == moves


def test_skewed_rows_move_the_heavy_shards_tail_to_the_light_one() -> None:
    topo = Topology.balanced(["s0", "s1"])
    # s0 (0-2047) holds 3x the rows of s1.
    stats = SlotStats(rows={s: (30 if s < 2048 else 10) for s in range(SLOTS)})
    [move] = plan_moves(topo, topo.shards, stats)
    assert (move.source, move.target) == ("s0", "s1")
    assert move.slots == tuple(range(move.slots[0], 2048)), "one contiguous tail range"
    after = shard_weights(topo, [float(stats.rows[s]) for s in range(SLOTS)], [move])
    assert abs(after["s0"] - after["s1"]) <= 30  # within one slot's weight
    # Balancing slot counts instead: this topology is already even.
    assert plan_moves(topo, topo.shards, stats, even=True) == []
    assert all(m.target != topo.shard_of_slot(s) for m in [move] for s in m.slots)


def test_one_hot_slot_too_big_to_move_usefully_plans_nothing_for_it() -> None:
    topo = Topology.balanced(["s0", "s1"])
    stats = SlotStats(rows={2047: 1_000_000})  # s0's tail slot is all its weight
    assert plan_moves(topo, topo.shards, stats) == []


def test_shrinking_drains_the_shards_left_out() -> None:
    topo = Topology.balanced(["s0", "s1", "s2", "s3"])
    moves = plan_moves(topo, topo.shards, _uniform(), to=2)
    moved = {s for m in moves for s in m.slots}
    assert moved == set(range(2048, SLOTS))
    assert {m.source for m in moves} == {"s2", "s3"}
    assert {m.target for m in moves} == {"s0", "s1"}
    after = shard_weights(topo, [1.0] * SLOTS, moves)
    assert after["s2"] == after["s3"] == 0
    assert after["s0"] == after["s1"] == 2048


def test_bad_to_names_what_to_do() -> None:
    topo = Topology.balanced(["s0", "s1", "s2", "s3"])
    with pytest.raises(MoveRefused, match=r"only 4 are registered.*tenfold shards add"):
        plan_moves(topo, topo.shards, _uniform(), to=8)
    with pytest.raises(MoveRefused, match="at least 1"):
        plan_moves(topo, topo.shards, _uniform(), to=0)
    with pytest.raises(MoveRefused, match="not registered here"):
        plan_moves(topo, ["s0", "s1"], _uniform(), to=4)
    with pytest.raises(MoveRefused, match="rows, bytes or load"):
        plan_moves(topo, topo.shards, _uniform(), by="cpu")


def test_empty_cluster_balances_slot_counts_and_estimates_copy_time() -> None:
    topo = Topology(2, (SlotRange(0, SLOTS - 1, "s0"),), ("s0", "s1"))
    assert plan_basis(SlotStats(), "rows", False) == "slots"
    [move] = plan_moves(topo, topo.shards, SlotStats())
    assert (move.ranges, move.rows) == ("2048-4095", 0)
    stats = SlotStats(rows={s: 2 for s in range(SLOTS)})
    [move] = with_copy_time(plan_moves(topo, topo.shards, stats), 1024.0)
    assert move.rows == 4096 and move.copy_s == pytest.approx(4.0)
    [unknown] = with_copy_time([move], None)
    assert unknown.copy_s is None


def test_slots_held_by_unfinished_moves_stay_put() -> None:
    topo = _grown(4, 4)
    held = set(range(900, 1024))  # the tail of s0, held by a move not yet completed
    moves = plan_moves(topo, topo.shards, _uniform(), to=8, frozen=held)
    assert not held & {s for m in moves for s in m.slots}
    [from_s0] = [m for m in moves if m.source == "s0"]
    assert from_s0.ranges == "388-899"  # the tail below the held slots, as much as before
    assert len(moves) == 4
