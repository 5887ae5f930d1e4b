"""TieredCache over a memory and a Redis L2: single-flight, SWR, fail-safe, invalidation."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tenfold.cache import L1Cache, L2Backend, MemoryL2, TieredCache, from_url
from tenfold.cache.redis import RedisL2
from tenfold.errors import CacheError, ConfigError

PEER = Path(__file__).with_name("cache_peer.py")
PROPAGATION_BOUND_S = 0.5


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Node:
    """One "process": its own L1 and TieredCache over a shared L2."""

    def __init__(self, cache: TieredCache, clock: FakeClock) -> None:
        self.cache = cache
        self.clock = clock


MakeNode = Callable[..., Node]


async def _delete_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=5)
    keys = [key async for key in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def make_node(request: pytest.FixtureRequest) -> AsyncIterator[MakeNode]:
    """`make_node(**options)` → a node; all nodes of a test share one L2 and one fake clock."""
    prefix = f"tfcache:{uuid.uuid4().hex[:10]}"
    clock = FakeClock()
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    shared_memory = MemoryL2(clock=clock)
    nodes: list[Node] = []

    def make(**options: Any) -> Node:
        l2: L2Backend = shared_memory if not url else RedisL2(url, timeout_s=2.0)
        l1 = L1Cache(clock=clock)
        node = Node(TieredCache(l1, l2, prefix=prefix, clock=clock, **options), clock)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.cache.close()
    if url:
        await _delete_prefix(url, prefix)


class Source:
    """A loader with a call count, a value to return and an optional failure or delay."""

    def __init__(self, value: Any = "v1", delay_s: float = 0.0) -> None:
        self.value = value
        self.delay_s = delay_s
        self.calls = 0
        self.error: Exception | None = None

    async def __call__(self) -> Any:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.value


async def _settle(cache: TieredCache) -> None:
    """Wait for background loads (stale refreshes) to land."""
    for _ in range(500):
        if not cache._flights:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("background load did not land")


async def _until(condition: Callable[[], Any], timeout_s: float = PROPAGATION_BOUND_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_stampede_calls_the_loader_once(make_node: MakeNode) -> None:
    cache = make_node().cache
    source = Source({"id": 7, "name": "room"}, delay_s=0.1)
    results = await asyncio.gather(*(cache.get_or_load("cold", source) for _ in range(1000)))
    assert source.calls == 1
    assert all(r == {"id": 7, "name": "room"} for r in results)
    results[0]["name"] = "mutated"  # every caller got its own copy
    assert await cache.get_or_load("cold", source) == {"id": 7, "name": "room"}
    assert source.calls == 1


async def test_hits_are_private_copies_even_of_nested_values(make_node: MakeNode) -> None:
    cache = make_node().cache
    original = {"members": [1, 2], "meta": {"open": True}}

    async def load() -> dict[str, Any]:
        return original

    first = await cache.get_or_load("nested", load)
    original["members"].append(3)  # the loader's object changes after it was cached
    first["meta"]["open"] = False  # and so does a caller's copy
    again = await cache.get_or_load("nested", load)  # an L1 hit
    assert again == {"members": [1, 2], "meta": {"open": True}}
    again["members"].clear()
    assert await cache.get_or_load("nested", load) == {"members": [1, 2], "meta": {"open": True}}


async def test_l2_hits_are_private_copies_on_every_later_read(make_node: MakeNode) -> None:
    # An L2 hit hands its reader the object it just decoded, and the copier is
    # planned only on the next read: no reader may see another's mutations.
    writer, reader = make_node(), make_node()
    value = {"members": [1, 2], "meta": {"open": True}}
    await writer.cache.set("room", value)
    source = Source("never called")
    reads = []
    for _ in range(4):  # L2 hit, then L1 hits: the re-decode, then the planned copier
        got = await reader.cache.get_or_load("room", source)
        assert got == value
        got["members"].append(99)
        got["meta"]["open"] = False
        reads.append(got)
    assert source.calls == 0
    assert len({id(r) for r in reads}) == 4
    assert len({id(r["members"]) for r in reads}) == 4


async def test_stale_while_revalidate_serves_stale_then_refreshes_once(
    make_node: MakeNode,
) -> None:
    node = make_node(ttl_s=10, stale_ttl_s=20)
    source = Source("v1")
    assert await node.cache.get_or_load("k", source) == "v1"
    node.clock.now += 15  # expired, within the stale window
    source.value, source.delay_s = "v2", 0.05
    stale = await asyncio.gather(*(node.cache.get_or_load("k", source) for _ in range(50)))
    assert stale == ["v1"] * 50  # nobody waited for the loader
    await _settle(node.cache)
    assert source.calls == 2  # one refresh for 50 stale reads
    assert await node.cache.get_or_load("k", source) == "v2"
    assert source.calls == 2


async def test_fail_safe_serves_the_old_value(make_node: MakeNode) -> None:
    node = make_node(ttl_s=10, fail_safe_max_s=60)
    source = Source("v1")
    assert await node.cache.get_or_load("k", source) == "v1"
    node.clock.now += 30  # expired, within the fail-safe window
    source.error = RuntimeError("database down")
    assert await node.cache.get_or_load("k", source) == "v1"
    source.error, source.value, source.delay_s = None, "slow", 5.0  # too slow: old value
    started = time.monotonic()
    assert await node.cache.get_or_load("k", source, soft_timeout_s=0.05) == "v1"
    assert time.monotonic() - started < 1.0
    node.cache._flights.pop(node.cache._full_key("k")).cancel()
    source.error, source.delay_s = RuntimeError("database down"), 0.0
    node.clock.now += 60  # beyond fail_safe_max_s: the error reaches the caller
    with pytest.raises(RuntimeError, match="database down"):
        await node.cache.get_or_load("k", source)


async def test_negative_caching(make_node: MakeNode) -> None:
    node = make_node(negative_ttl_s=5)
    source = Source(None)
    assert await node.cache.get_or_load("missing", source) is None
    assert await node.cache.get_or_load("missing", source) is None
    assert source.calls == 1
    node.clock.now += 5
    source.value = "found"
    assert await node.cache.get_or_load("missing", source) == "found"
    assert source.calls == 2
    off = make_node(negative_ttl_s=0)
    never = Source(None)
    assert await off.cache.get_or_load("n", never) is None
    assert await off.cache.get_or_load("n", never) is None
    assert never.calls == 2


@pytest.mark.parametrize(
    "value", [object(), {"set": {1, 2}}, "x" * 300], ids=["object", "set", "oversized"]
)
async def test_unserialisable_or_oversized_is_an_error_and_not_cached(
    make_node: MakeNode, value: Any
) -> None:
    cache = make_node(max_value_bytes=256).cache
    with pytest.raises(CacheError, match="bad:1"):
        await cache.set("bad:1", value)
    with pytest.raises(CacheError, match="bad:2"):
        await cache.get_or_load("bad:2", Source(value))
    for key in ("bad:1", "bad:2"):
        full = cache._full_key(key)
        assert full not in cache.l1
        assert await cache.l2.get(full) is None
    assert await cache.get_or_load("bad:2", Source("fine")) == "fine"


@pytest.mark.parametrize(
    "key", ["", "\ud800", "k" * 600, 42], ids=["empty", "surrogate", "long", "int"]
)
async def test_bad_keys_are_errors(make_node: MakeNode, key: Any) -> None:
    cache = make_node().cache
    with pytest.raises(CacheError):
        await cache.get_or_load(key, Source())


async def test_invalidate_reaches_every_node(make_node: MakeNode) -> None:
    a, b = make_node(), make_node()
    source = Source("v1")
    assert await a.cache.get_or_load("k", source) == "v1"
    assert await b.cache.get_or_load("k", source) == "v1"  # from L2 into b's L1
    assert source.calls == 1
    full = b.cache._full_key("k")
    await b.cache.start()
    source.value = "v2"
    await a.cache.invalidate("k")

    async def dropped() -> bool:
        return full not in b.cache.l1

    await _until(dropped)
    assert await b.cache.get_or_load("k", source) == "v2"
    assert await a.cache.get_or_load("k", source) == "v2"
    assert source.calls == 2


async def test_set_replaces_and_drops_peer_copies(make_node: MakeNode) -> None:
    a, b = make_node(), make_node()
    await a.cache.set("k", "v1")
    assert await b.cache.get_or_load("k", Source("unused")) == "v1"
    await a.cache.set("k", "v2")

    async def updated() -> bool:
        return await b.cache.get_or_load("k", Source("unused")) == "v2"

    await _until(updated)


async def test_invalidate_tag(make_node: MakeNode) -> None:
    a, b = make_node(), make_node()
    await a.cache.get_or_load("room:1", Source("r1"), tags=["user:9"])
    await a.cache.set("room:2", "r2", tags=["user:9", "other"])
    await a.cache.set("room:3", "r3", tags=["other"])
    for key in ("room:1", "room:2", "room:3"):
        await b.cache.get_or_load(key, Source("unused"))
    await a.cache.invalidate_tag("user:9")
    fresh = Source("reloaded")

    async def dropped() -> bool:
        return all(b.cache._full_key(k) not in b.cache.l1 for k in ("room:1", "room:2"))

    await _until(dropped)
    assert await b.cache.get_or_load("room:1", fresh) == "reloaded"
    assert await a.cache.get_or_load("room:2", fresh) == "reloaded"
    assert await b.cache.get_or_load("room:3", fresh) == "r3"  # other tag: untouched
    assert fresh.calls == 2


async def _silent_server() -> tuple[asyncio.Server, str]:
    """A TCP server that accepts connections and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize("kind", ["dead port", "silent server"])
async def test_redis_down_is_a_miss_within_the_timeout(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = None
    url = "redis://127.0.0.1:1/0"
    if kind == "silent server":
        server, url = await _silent_server()
    cache = TieredCache(L1Cache(), RedisL2(url, timeout_s=0.2), prefix="tfdown")
    try:
        source = Source("from the loader")
        started = time.monotonic()
        assert await cache.get_or_load("k", source) == "from the loader"
        assert time.monotonic() - started < 1.0  # subscribe + get, each bounded by 0.2 s
        await cache.invalidate("k")
        await cache.set("j", "v")
        await cache.invalidate_tag("t")
        assert await cache.get_or_load("k", source) == "from the loader"  # L1 still works
        assert time.monotonic() - started < 1.5
        warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1  # logged once per outage
    finally:
        await cache.close()
        if server is not None:
            server.close()


async def test_invalidation_across_processes(redis_url: str, tmp_path: Path) -> None:
    prefix = f"tfcache:{uuid.uuid4().hex[:10]}"
    source = tmp_path / "source.txt"
    source.write_text("v1")
    cache = TieredCache(L1Cache(), RedisL2(redis_url, timeout_s=2.0), prefix=prefix)
    peer = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PEER),
        redis_url,
        prefix,
        "k",
        str(source),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert peer.stdout is not None
        async with asyncio.timeout(15):
            ready = (await peer.stdout.readline()).decode().split()
        assert ready == ["ready", "v1"]
        source.write_text("v2")  # the "database" changes; the peer still serves its L1 copy
        await asyncio.sleep(0.2)
        assert peer.returncode is None
        started = time.time()
        await cache.invalidate("k")
        async with asyncio.timeout(5):
            changed = (await peer.stdout.readline()).decode().split()
        assert changed[0] == "changed" and changed[2] == "v2"
        delay_s = float(changed[1]) - started
        print(f"cross-process invalidation delay: {delay_s * 1000:.1f} ms")
        assert delay_s < PROPAGATION_BOUND_S
        async with asyncio.timeout(5):
            assert await peer.wait() == 0
    finally:
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
        await cache.close()
        await _delete_prefix(redis_url, prefix)


async def test_from_url_picks_the_backend() -> None:
    assert isinstance(from_url("memory://", max_entries=10), MemoryL2)
    redis_l2 = from_url("redis://127.0.0.1:1/0", timeout_s=0.1)
    assert isinstance(redis_l2, RedisL2)
    await redis_l2.close()
    with pytest.raises(ConfigError, match="unknown scheme"):
        from_url("memcached://x")
    with pytest.raises(ConfigError, match="ttl_s"):
        TieredCache(L1Cache(), MemoryL2(), prefix="p", ttl_s=0)
