"""The sharded database: routing by slot, pools, replicas, scatter-gather, migrations."""

from tenfold.data.base import (
    Connection,
    Pool,
    PoolOptions,
    PoolStats,
    pool_from_url,
    register_backend,
)
from tenfold.data.router import ShardedDatabase, ShardHealth
from tenfold.data.scatter import ScatterResult

__all__ = [
    "Connection",
    "Pool",
    "PoolOptions",
    "PoolStats",
    "ScatterResult",
    "ShardHealth",
    "ShardedDatabase",
    "pool_from_url",
    "register_backend",
]
