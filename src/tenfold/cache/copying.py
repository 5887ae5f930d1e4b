"""Private copies of cached values, made fast for plain JSON shapes.

Every caller of the cache gets its own copy of a mutable value: one caller
mutating its result never changes what the next caller reads. Decoding the
value's JSON again (`orjson.loads`) makes such a copy, but on an L1 hit it is
most of the cost. For values that are plain JSON (dicts with str keys, lists,
str, int, finite float, bool, None) a copier planned once, when the value is
stored, copies only the containers (`dict.copy`, `list.copy`) and shares the
immutable leaves: the same result as decoding the JSON again, at a fraction of
the cost. Other values (tuples, dataclasses, datetimes, non-str keys, very
large or deep structures) keep the JSON round trip, whose result can differ
from the original (a tuple comes back as a list) in the same way on every tier.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["Copier", "copier_for"]

Copier = Callable[[Any], Any]
_MAX_NODES = 512  # past this, planning and copying cost about what decoding does
_MAX_DEPTH = 16


class _NotPlain(Exception):
    """The value is not plain JSON (or too big to plan): decode it instead."""


def copier_for(value: Any, encoded: bytes | None = None) -> Copier:
    """A function returning a private copy of `value` (whose JSON is `encoded`, if known).

    `value` must be owned by the cache (not the caller's object): the planned
    copier reads it on every call.
    """
    try:
        budget = [_MAX_NODES]
        plan = _plan(value, 0, budget)
    except _NotPlain:
        data = orjson.dumps(value) if encoded is None else encoded
        return lambda _value: orjson.loads(data)
    if plan is None:  # an immutable leaf (callers handle those before asking)
        return _same
    return plan


def _same(value: Any) -> Any:
    return value


def _plan(value: Any, depth: int, budget: list[int]) -> Copier | None:
    """None for a shared immutable leaf, else the copier of this container."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return None
    if kind is float:
        if math.isfinite(value):  # JSON has no NaN/inf: orjson writes them as null
            return None
        raise _NotPlain
    budget[0] -= 1
    if budget[0] < 0 or depth >= _MAX_DEPTH:
        raise _NotPlain
    if kind is list:
        inner = [_plan(item, depth + 1, budget) for item in value]
        if all(p is None for p in inner):
            return list.copy
        nested = [(i, p) for i, p in enumerate(inner) if p is not None]

        def copy_list(v: list[Any]) -> list[Any]:
            out = v.copy()
            for i, p in nested:
                out[i] = p(v[i])
            return out

        return copy_list
    if kind is dict:
        mutable: list[tuple[str, Copier]] = []
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlain  # orjson would turn the key into a str
            p = _plan(item, depth + 1, budget)
            if p is not None:
                mutable.append((key, p))
        if not mutable:
            return dict.copy

        def copy_dict(v: dict[str, Any]) -> dict[str, Any]:
            out = v.copy()
            for k, p in mutable:
                out[k] = p(v[k])
            return out

        return copy_dict
    raise _NotPlain
