"""The keyspace: slot_of (canonical encoding, stability across processes) and Topology."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import uuid
from collections import Counter

import pytest
import xxhash
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tenfold.errors import KeyspaceError, TopologyError
from tenfold.keyspace import SLOTS, SlotRange, Topology, canonical_bytes, slot_of

keys = st.one_of(
    st.text(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.binary(),
    st.uuids(),
)


def _xxh(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data) % 4096


def _int_bytes(n: int) -> bytes:
    """Signed big-endian two's complement in the fewest bytes, written out by hand."""
    size = 1
    while not -(1 << (8 * size - 1)) <= n < 1 << (8 * size - 1):
        size += 1
    return bytes((n >> (8 * i)) & 0xFF for i in reversed(range(size)))


# --- slot_of -------------------------------------------------------------


@given(keys)
def test_slot_of_is_in_range_and_deterministic(key: object) -> None:
    slot = slot_of(key)  # type: ignore[arg-type]
    assert type(slot) is int
    assert 0 <= slot < 4096
    assert slot_of(key) == slot  # type: ignore[arg-type]


@given(keys)
def test_slot_of_hashes_the_canonical_bytes(key: object) -> None:
    assert slot_of(key) == _xxh(canonical_bytes(key))  # type: ignore[arg-type]


GOLDEN_UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize(
    ("key", "encoded"),
    [
        ("alice", b"s" + b"alice"),
        ("", b"s"),
        ("h\u00e9llo \u2603", b"s" + "h\u00e9llo \u2603".encode()),
        (b"alice", b"b" + b"alice"),
        (b"\x00\xff", b"b\x00\xff"),
        (0, b"i\x00"),
        (1, b"i\x01"),
        (127, b"i\x7f"),
        (128, b"i\x00\x80"),
        (255, b"i\x00\xff"),
        (-1, b"i\xff"),
        (-128, b"i\x80"),
        (-129, b"i\xff\x7f"),
        (-32768, b"i\x80\x00"),
        (2**63 - 1, b"i\x7f" + b"\xff" * 7),
        (-(2**63), b"i\x80" + b"\x00" * 7),
        (2**64, b"i\x01" + b"\x00" * 8),
        (GOLDEN_UUID, b"u" + bytes.fromhex("12345678123456781234567812345678")),
    ],
)
def test_golden_encoding_and_slots(key: object, encoded: bytes) -> None:
    assert canonical_bytes(key) == encoded  # type: ignore[arg-type]
    assert slot_of(key) == _xxh(encoded)  # type: ignore[arg-type]


@given(st.integers(min_value=-(2**300), max_value=2**300))
@example(-128)
@example(-(2**31))
@example(-(2**63))
@example(2**63)
def test_int_encoding_is_minimal_signed_big_endian(n: int) -> None:
    assert canonical_bytes(n) == b"i" + _int_bytes(n)
    assert int.from_bytes(canonical_bytes(n)[1:], "big", signed=True) == n


STABLE_KEYS = ["alice", "", "bob", "\u2603", 0, 1, -1, -128, 2**100, -(2**70), b"", b"x\x00y"]
STABLE_KEYS += [GOLDEN_UUID, uuid.UUID(int=0)]


def _subprocess_slots(seed: str) -> list[int]:
    code = (
        "import json, sys\n"
        "from tenfold.keyspace import slot_of\n"
        "keys = json.loads(sys.stdin.read())\n"
        "import uuid\n"
        "decode = {'s': str, 'i': int, 'b': bytes.fromhex, 'u': uuid.UUID}\n"
        "print(json.dumps([slot_of(decode[t](v)) for t, v in keys]))\n"
    )
    payload = [
        ["b", k.hex()]
        if isinstance(k, bytes)
        else ["i", str(k)]
        if isinstance(k, int)
        else ["u", str(k)]
        if isinstance(k, uuid.UUID)
        else ["s", k]
        for k in STABLE_KEYS
    ]
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_slot_of_is_identical_across_processes_and_hash_seeds() -> None:
    here = [slot_of(k) for k in STABLE_KEYS]  # type: ignore[arg-type]
    for seed in ("0", "1", "12345"):
        assert _subprocess_slots(seed) == here


# --- type tags and refused keys ----------------------------------------------


def test_type_tags_keep_str_int_bytes_apart() -> None:
    encodings = {canonical_bytes("1"), canonical_bytes(1), canonical_bytes(b"1")}
    assert len(encodings) == 3
    uuid_key = uuid.UUID(int=0)
    assert canonical_bytes(uuid_key) != canonical_bytes(uuid_key.bytes)


@given(st.binary())
def test_str_and_bytes_with_the_same_payload_differ(data: bytes) -> None:
    text = data.decode("latin-1")
    assert canonical_bytes(text) != canonical_bytes(data)


@pytest.mark.parametrize("n", [2**64, 2**1000, -(2**64), -(2**1000) - 7, -5, -(2**31)])
def test_big_and_negative_ints_work(n: int) -> None:
    slot = slot_of(n)
    assert 0 <= slot < SLOTS
    assert int.from_bytes(canonical_bytes(n)[1:], "big", signed=True) == n
    assert canonical_bytes(n) != canonical_bytes(-n)


@pytest.mark.parametrize("bad", [None, True, False, 1.5, [1], {"a": 1}, (1,), {1}])
def test_unsupported_key_types_raise_type_error_naming_the_type(bad: object) -> None:
    with pytest.raises(TypeError) as info:
        slot_of(bad)  # type: ignore[arg-type]
    assert type(bad).__name__ in str(info.value)
    with pytest.raises(TypeError):
        canonical_bytes(bad)  # type: ignore[arg-type]


# --- Topology ------------------------------------------------------------


def _names(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 4095, 4096])
def test_balanced_covers_every_slot_with_sizes_within_one(n: int) -> None:
    topo = Topology.balanced(_names(n))
    owners = [topo.shard_of_slot(s) for s in range(SLOTS)]
    counts = Counter(owners)
    assert set(counts) == set(_names(n))
    assert sum(counts.values()) == SLOTS
    assert max(counts.values()) - min(counts.values()) <= 1
    for name in _names(n):
        assert topo.slot_count(name) == counts[name]
        assert sum(r.size for r in topo.slots_of(name)) == counts[name]
    assert topo.epoch == 1


@pytest.mark.parametrize("n", [0, 4097])
def test_balanced_rejects_bad_shard_counts(n: int) -> None:
    with pytest.raises(TopologyError, match=str(n)):
        Topology.balanced(_names(n))


def test_topology_with_a_gap_is_rejected() -> None:
    ranges = (SlotRange(0, 99, "a"), SlotRange(101, SLOTS - 1, "b"))
    with pytest.raises(TopologyError, match="unowned") as info:
        Topology(1, ranges, ("a", "b"))
    assert "100" in str(info.value)


def test_topology_with_an_overlap_is_rejected_naming_the_slot() -> None:
    ranges = (SlotRange(0, 2000, "a"), SlotRange(2000, SLOTS - 1, "b"))
    with pytest.raises(TopologyError, match="owned twice") as info:
        Topology(1, ranges, ("a", "b"))
    assert "slot 2000" in str(info.value)


def test_topology_with_an_unknown_shard_is_rejected_naming_it() -> None:
    ranges = (SlotRange(0, 99, "a"), SlotRange(100, SLOTS - 1, "ghost"))
    with pytest.raises(TopologyError, match="ghost"):
        Topology(1, ranges, ("a", "b"))


@pytest.mark.parametrize(
    "ranges",
    [(SlotRange(0, SLOTS, "a"),), (SlotRange(-1, SLOTS - 1, "a"),)],
)
def test_topology_with_out_of_range_slots_is_rejected(ranges: tuple[SlotRange, ...]) -> None:
    with pytest.raises(TopologyError):
        Topology(1, ranges, ("a",))


def test_topology_rejects_epoch_zero_and_duplicate_names() -> None:
    with pytest.raises(TopologyError):
        Topology(0, (SlotRange(0, SLOTS - 1, "a"),), ("a",))
    with pytest.raises(TopologyError):
        Topology(1, (SlotRange(0, SLOTS - 1, "a"),), ("a", "a"))


def test_shard_of_slot_rejects_slots_outside_the_keyspace() -> None:
    topo = Topology.balanced(_names(2))
    for bad in (-1, SLOTS):
        with pytest.raises(KeyspaceError):
            topo.shard_of_slot(bad)


TOPOS = [Topology.balanced(_names(n)) for n in (1, 3, 7, 64)]


@given(keys, st.sampled_from(TOPOS))
def test_shard_of_key_is_the_owner_of_its_slot(key: object, topo: Topology) -> None:
    slot = slot_of(key)  # type: ignore[arg-type]
    shard = topo.shard_of(key)  # type: ignore[arg-type]
    assert shard == topo.shard_of_slot(slot)
    assert any(r.first <= slot <= r.last for r in topo.slots_of(shard))


@given(
    st.sampled_from(TOPOS),
    st.lists(st.integers(0, SLOTS - 1), max_size=50),
    st.sampled_from(["s0", "s1", "new"]),
)
@settings(max_examples=50)
def test_to_dict_from_dict_round_trip(topo: Topology, moved: list[int], to: str) -> None:
    derived = topo.with_slots_moved(moved, to)
    for t in (topo, derived):
        data = json.loads(json.dumps(t.to_dict()))
        back = Topology.from_dict(data)
        assert back == t
        assert [back.shard_of_slot(s) for s in range(SLOTS)] == [
            t.shard_of_slot(s) for s in range(SLOTS)
        ]


@pytest.mark.parametrize(
    "garbage",
    [
        {},
        {"epoch": 1, "shards": ["a"]},
        {"epoch": "x", "shards": ["a"], "ranges": [[0, SLOTS - 1, "a"]]},
        {"epoch": 1, "shards": ["a"], "ranges": [[0, SLOTS - 1]]},
        {"epoch": 1, "shards": ["a"], "ranges": 7},
        {"epoch": 1, "shards": ["a"], "ranges": [[0, 10, "a"]]},
        {"epoch": 1, "shards": ["a"], "ranges": [[0, SLOTS - 1, "b"]]},
        {"epoch": None, "shards": ["a"], "ranges": [[0, SLOTS - 1, "a"]]},
        None,
        "garbage",
        [1, 2, 3],
        42,
    ],
)
def test_from_dict_of_garbage_raises_topology_error(garbage: object) -> None:
    with pytest.raises(TopologyError):
        Topology.from_dict(garbage)  # type: ignore[arg-type]


@given(
    st.sampled_from(TOPOS),
    st.sets(st.integers(0, SLOTS - 1), max_size=100),
    st.sampled_from(["s0", "s2", "fresh"]),
)
@settings(max_examples=50)
def test_with_slots_moved(topo: Topology, moved: set[int], to: str) -> None:
    after = topo.with_slots_moved(sorted(moved), to)
    assert after.epoch == topo.epoch + 1
    assert topo.epoch == 1  # the original is untouched
    for slot in range(SLOTS):
        expected = to if slot in moved else topo.shard_of_slot(slot)
        assert after.shard_of_slot(slot) == expected
    assert set(topo.shards) <= set(after.shards)
    assert to in after.shards


def test_with_slots_moved_twice_keeps_bumping_the_epoch() -> None:
    topo = Topology.balanced(["a", "b"])
    later = topo.with_slots_moved([0], "b").with_slots_moved([1], "b")
    assert later.epoch == 3
    assert later.shard_of_slot(0) == later.shard_of_slot(1) == "b"
    assert later.slot_count("b") == SLOTS // 2 + 2


def test_with_slots_moved_rejects_bad_slots() -> None:
    topo = Topology.balanced(["a", "b"])
    with pytest.raises(KeyspaceError):
        topo.with_slots_moved([SLOTS], "a")


# --- distribution --------------------------------------------------------


def test_random_str_keys_spread_evenly_over_slots() -> None:
    rng = random.Random(20240101)
    n = 200_000
    keys_ = [f"user-{rng.getrandbits(64):x}" for _ in range(n)]
    counts = [0] * SLOTS
    for k in keys_:
        counts[slot_of(k)] += 1
    expected = n / SLOTS
    chi2 = sum((c - expected) ** 2 for c in counts) / expected
    df = SLOTS - 1
    # chi2 with 4095 degrees of freedom is ~ Normal(df, sqrt(2 df)); 6 sigma is far
    # beyond chance but catches any real skew (or a constant or modulo-biased hash).
    assert abs(chi2 - df) < 6 * math.sqrt(2 * df)
    # Each slot count is ~ Poisson(48.8): 6 sigma either side.
    sigma = math.sqrt(expected)
    assert min(counts) > expected - 6 * sigma
    assert max(counts) < expected + 6 * sigma
