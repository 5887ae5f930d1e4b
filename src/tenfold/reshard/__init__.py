"""Online resharding: move slots between shards under load, with nothing lost.

    from tenfold.reshard import Mover
    await Mover(db).move("0-255", to="s4", until="completed")

or `await db.move_slots("0-255", "s4")`, or `tenfold shards move 0-255 --to s4`.
See docs/resharding.md for the workflow, its guarantees and its failure table.
"""

from tenfold.reshard.slots import format_ranges, parse_slots, to_ranges
from tenfold.reshard.store import MoveRecord
from tenfold.reshard.workflow import MoveOptions, Mover

__all__ = ["MoveOptions", "MoveRecord", "Mover", "format_ranges", "parse_slots", "to_ranges"]
