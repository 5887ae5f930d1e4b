"""Private copies of cached values: the same as decoding the JSON again, never shared."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from tenfold.cache.copying import copier_for

leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
leaves |= st.floats(allow_nan=False, allow_infinity=False)
plain = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=60,
)


def containers(value: Any) -> list[int]:
    """ids of every list and dict inside `value`."""
    if isinstance(value, list):
        return [id(value), *[i for v in value for i in containers(v)]]
    if isinstance(value, dict):
        return [id(value), *[i for v in value.values() for i in containers(v)]]
    return []


@given(plain)
def test_copy_equals_the_json_round_trip_and_shares_no_container(value: Any) -> None:
    encoded = orjson.dumps(value)
    copy = copier_for(value, encoded)(value)
    assert copy == orjson.loads(encoded)
    assert not set(containers(copy)) & set(containers(value))


def test_mutating_a_copy_leaves_the_source_alone() -> None:
    source = {"members": [1, 2, {"n": [3]}], "meta": {"open": True}, "name": "r"}
    copier = copier_for(source, orjson.dumps(source))
    first = copier(source)
    first["members"][2]["n"].append(4)
    first["meta"]["open"] = False
    first["name"] = "changed"
    assert copier(source) == {"members": [1, 2, {"n": [3]}], "meta": {"open": True}, "name": "r"}


def test_values_that_are_not_plain_json_are_decoded_again() -> None:
    for value in (
        {"pair": (1, 2)},  # a tuple comes back as a list, on every tier alike
        {1: "int key"},
        {"nan": float("nan")},
        [list(range(10))] * 100,  # past the planning budget
    ):
        encoded = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        copy = copier_for(value, encoded)(value)
        assert copy == orjson.loads(encoded)


@given(plain)
def test_an_entry_decoded_from_l2_never_shares_a_container_between_readers(value: Any) -> None:
    from tenfold.cache.tiered import TieredCache

    raw = orjson.dumps([2e9, 2e9, 2e9, value, ["t"], 0.5])
    meta = TieredCache._decode(raw)
    assert meta is not None and meta.tags == ("t",) and meta.load_s == 0.5
    reads = [meta.private() for _ in range(4)]  # hand-over, re-decode, planned copier x2
    assert all(r == orjson.loads(orjson.dumps(value)) for r in reads)
    seen = [i for r in reads for i in containers(r)]
    assert len(seen) == len(set(seen))


def test_envelopes_that_are_not_ours_decode_as_misses() -> None:
    from tenfold.cache.tiered import TieredCache

    for raw in (b"{}", b"[1,2,3]", b'[1,2,"3",{},[],0]', b"[1,2,3,{},{},0]", b"[true,2,3,{},[]]"):
        assert TieredCache._decode(raw) is None
    old = TieredCache._decode(b'[1,2,3,{"a":[1]},["t",7]]')  # 5 fields: before load_s
    assert old is not None and old.load_s == 0.0 and old.tags == ("t",)
