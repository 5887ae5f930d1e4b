"""tenfold: take an application backend from one box to very many users without a rewrite."""

from tenfold.config import Settings, load_settings
from tenfold.data import ShardedDatabase
from tenfold.ids import IdGenerator, slot_of_id
from tenfold.keyspace import SLOTS, Topology, slot_of

__version__ = "0.1.0"

__all__ = [
    "SLOTS",
    "IdGenerator",
    "Settings",
    "ShardedDatabase",
    "Topology",
    "__version__",
    "load_settings",
    "slot_of",
    "slot_of_id",
]
