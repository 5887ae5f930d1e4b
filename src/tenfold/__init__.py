"""tenfold: take an application backend from one box to very many users without a rewrite."""

from typing import Any

from tenfold.config import Settings, load_settings
from tenfold.data import ShardedDatabase
from tenfold.ids import IdGenerator, slot_of_id
from tenfold.keyspace import SLOTS, Topology, slot_of

__version__ = "0.1.0"


def install(app: Any, runtime: Any = None) -> Any:
    """`tenfold.gateway.install`: imported on use, so the CLI does not load the web stack."""
    from tenfold.gateway import install as _install

    return _install(app, runtime)


__all__ = [
    "SLOTS",
    "IdGenerator",
    "Settings",
    "ShardedDatabase",
    "Topology",
    "__version__",
    "install",
    "load_settings",
    "slot_of",
    "slot_of_id",
]
