"""Key → slot lookup speed: `tenfold.keyspace.slot_of` against a ketama hash ring.

Measured: lookups per second over the same fixed-seed list of mixed keys (str
user ids, ints, bytes, uuid.UUID; 1,000,000, or 20,000 with `--quick`), built
once before any timing. The peer is `uhashring.HashRing(hash_fn="ketama")` with
16 nodes, `get_node(key)`: the usual pure-Python consistent-hash ring.

Why it is fair: both sides get the very same key objects and are timed by the
same plain `for` loop (its cost is included for both). uhashring accepts any
key because it hashes `str(key)` itself, so on native keys its cost includes
that `str()`, just as tenfold's includes building its canonical bytes. A third
row gives uhashring `str(key)` computed outside the timed loop, its best case.
`slot_of` stops at the slot while `get_node` ends at a node, so a fourth row
times `Topology.shard_of` over 16 shards, the exact counterpart of `get_node`.
Rounds run the sides in alternating order and medians are reported.
"""

from __future__ import annotations

import gc
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from rich.table import Table
from uhashring import HashRing

from benchmarks._common import main as run_main
from benchmarks._common import median, sides_table
from tenfold.keyspace import Key, Topology, slot_of

SEED = 20240602
NODES = [f"node{i}" for i in range(16)]
PEER = "uhashring get_node"
KINDS = ("str", "int", "bytes", "uuid")
WEIGHTS = (40, 30, 15, 15)  # percent of each kind in the mix


def make_keys(n: int, seed: int = SEED) -> list[Key]:
    """`n` keys of mixed types, the same for a given seed on every run."""
    rng = random.Random(seed)
    makers: dict[str, Callable[[], Key]] = {
        "str": lambda: f"user:{rng.getrandbits(40)}",
        "int": lambda: rng.getrandbits(63) - (1 << 62),
        "bytes": lambda: rng.randbytes(16),
        "uuid": lambda: uuid.UUID(int=rng.getrandbits(128), version=4),
    }
    return [makers[kind]() for kind in rng.choices(KINDS, WEIGHTS, k=n)]


def keys_per_second(lookup: Callable[[Any], Any], keys: Sequence[Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    for key in keys:
        lookup(key)
    return len(keys) / (time.perf_counter() - start)


def run(quick: bool) -> dict[str, Any]:
    n, rounds = (20_000, 3) if quick else (1_000_000, 5)
    keys = make_keys(n)
    str_keys = [str(k) for k in keys]
    ring = HashRing(nodes=NODES, hash_fn="ketama")
    topology = Topology.balanced([f"s{i}" for i in range(len(NODES))])
    sides: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
        "tenfold slot_of": (slot_of, keys),
        PEER: (ring.get_node, keys),
        "uhashring get_node str()": (ring.get_node, str_keys),
        "tenfold shard_of": (topology.shard_of, keys),
    }
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            samples[name].append(keys_per_second(*sides[name]))
    medians = {name: median(values) for name, values in samples.items()}
    peer = medians[PEER]
    return {
        "keys": n,
        "rounds": rounds,
        "seed": SEED,
        "mix_percent": dict(zip(KINDS, WEIGHTS, strict=True)),
        "nodes": len(NODES),
        "ring_points": len(ring.runtime._keys),
        "keys_per_s_median": medians,
        "keys_per_s_rounds": samples,
        "ratio_slot_of_vs_uhashring": medians["tenfold slot_of"] / peer,
        "ratio_shard_of_vs_uhashring": medians["tenfold shard_of"] / peer,
        "ratio_slot_of_vs_uhashring_str_keys": (
            medians["tenfold slot_of"] / medians["uhashring get_node str()"]
        ),
    }


def render(result: dict[str, Any]) -> Table:
    return sides_table(
        f"Slot lookup: {result['keys']:,} mixed keys, median of {result['rounds']} rounds",
        f"peer: uhashring ketama ring, {result['nodes']} nodes ({result['ring_points']} points)",
        "keys/s",
        result["keys_per_s_rounds"],
        PEER,
    )


if __name__ == "__main__":
    raise SystemExit(run_main("slot_lookup", __doc__ or "", run, render))
