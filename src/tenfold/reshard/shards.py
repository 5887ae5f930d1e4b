"""Registering a new, empty shard: `tenfold shards add NAME URL`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenfold.config import ShardSpec, redact_url
from tenfold.data import migrations
from tenfold.data.schema import _plan
from tenfold.errors import ConfigError, MoveRefused
from tenfold.keyspace import Topology
from tenfold.reshard.capture import ShardSide
from tenfold.reshard.store import MoveStore
from tenfold.reshard.tables import slot_tables

if TYPE_CHECKING:
    from tenfold.data.router import ShardedDatabase

__all__ = ["add_shard"]


async def add_shard(db: ShardedDatabase, name: str, url: str) -> Topology:
    """Create and migrate shard `name` at `url`, record it in the catalog, and list it
    in a new topology epoch owning no slots. Every router opens it by name once a
    topology routes slots to it. Idempotent for the same name and URL.

    Raises:
        ConfigError: a malformed name or URL.
        MoveRefused: the name is taken by a shard with another URL.
    """
    try:
        spec = ShardSpec(name=name, url=url)
    except ConfigError as exc:  # it names TENFOLD_SHARDS; these came from the caller
        raise MoveRefused(f"shard {name!r} at {redact_url(url)}: {exc.problem}") from None
    if name in db.shard_names:
        if db.pool(name).url != spec.url:
            raise MoveRefused(
                f"shard {name} already exists with another URL ({db.pool(name).safe_url}); "
                "choose a new name"
            )
    else:
        db._add_shard(spec)
    pool = db.pool(name)
    await pool.create_database()
    await migrations.apply(pool, _plan(db.settings.migrations_dir, "shard"))
    # Ready to receive: the reshard tables and triggers exist before any move.
    await ShardSide(pool).install(await slot_tables(pool))
    store = MoveStore(db.catalog)
    await store.register_shard(name, spec.url)
    topology = await store.add_to_topology(name)
    await db.refresh_topology()
    return topology
