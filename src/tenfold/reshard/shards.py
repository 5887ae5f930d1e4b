"""Registering a new, empty shard: `tenfold shards add NAME URL`."""

from __future__ import annotations

from pathlib import Path
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


async def add_shard(
    db: ShardedDatabase, name: str, url: str, folder: Path | None = None
) -> Topology:
    """Create and migrate shard `name` at `url`, record it in the catalog, and list it
    in a new topology epoch owning no slots. Every router opens it by name once a
    topology routes slots to it. Idempotent for the same name and URL.

    Args:
        folder: the app's migrations folder (default `settings.migrations_dir`).

    Raises:
        ConfigError: a malformed name or URL.
        MoveRefused: the name is taken by a shard with another URL, or the new
            shard lacks migrations the other shards have (the app's folder was
            not given): nothing is registered.
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
        added = False
    else:
        db._add_shard(spec)
        added = True
    pool = db.pool(name)
    try:
        await pool.create_database()
        await migrations.apply(pool, _plan(folder or db.settings.migrations_dir, "shard"))
        await _same_schema_as_the_others(db, name)
    except BaseException:
        if added:  # registered nowhere: this process forgets it too
            await db._forget_shard(name)
        raise
    # Ready to receive: the reshard tables and triggers exist before any move.
    await ShardSide(pool).install(await slot_tables(pool))
    store = MoveStore(db.catalog)
    await store.register_shard(name, spec.url)
    topology = await store.add_to_topology(name)
    await db.refresh_topology()
    return topology


async def _same_schema_as_the_others(db: ShardedDatabase, name: str) -> None:
    """Refuse a new shard that lacks migrations another shard has applied: a move
    onto it would find tables missing (the app's migrations folder was not given)."""
    others = [n for n in db.topology.shards if n != name]
    if not others:
        return
    have = set(await migrations.applied_names(db.pool(name)))
    want = set(await migrations.applied_names(db.pool(others[0])))
    missing = sorted(want - have)
    if missing:
        raise MoveRefused(
            f"shard {name} lacks migration(s) {', '.join(missing)} that {others[0]} has: "
            "give the app's migrations folder (`tenfold shards add NAME URL --dir FOLDER` "
            "or TENFOLD_MIGRATIONS_DIR) and add it again"
        )
