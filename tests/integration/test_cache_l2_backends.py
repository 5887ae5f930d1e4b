"""One behavioural suite for every cache L2 backend (memory, Redis): the contract of
`tenfold.cache.base.L2Backend`, below the tiered cache that test_cache_tiered.py drives.

TTLs are checked with wide margins (Redis expires on its own clock) and by
polling for the expiry, never by a tight sleep.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from tenfold.cache import L2Backend, MemoryL2
from tenfold.cache.redis import RedisL2
from tests.integration.support import wait_until

MakeL2 = Callable[[], L2Backend]


@pytest.fixture(params=["memory", "redis"])
async def make_l2(request: pytest.FixtureRequest) -> AsyncIterator[MakeL2]:
    """`make_l2()` → an L2; memory ones are one shared store (like one Redis)."""
    made: list[L2Backend] = []
    shared = MemoryL2()
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""

    def make() -> L2Backend:
        l2: L2Backend = RedisL2(url, timeout_s=2.0) if url else shared
        made.append(l2)
        return l2

    yield make
    for l2 in made:
        await l2.close()


@pytest.fixture
def prefix() -> str:
    return f"tftest:l2:{uuid.uuid4().hex[:10]}:"


async def test_get_set_delete(make_l2: MakeL2, prefix: str) -> None:
    l2 = make_l2()
    assert await l2.get(prefix + "a") is None
    await l2.set(prefix + "a", b"\x00one", 30)
    assert await l2.get(prefix + "a") == b"\x00one"  # bytes in, the same bytes out
    await l2.set(prefix + "a", b"two", 30)
    assert await l2.get(prefix + "a") == b"two"
    await l2.delete(prefix + "a")
    assert await l2.get(prefix + "a") is None
    await l2.delete(prefix + "never")  # deleting a missing key is fine


async def test_values_expire_after_their_ttl(make_l2: MakeL2, prefix: str) -> None:
    l2 = make_l2()
    await l2.set(prefix + "short", b"s", 0.2)
    await l2.set(prefix + "long", b"l", 60)

    async def gone() -> bool:
        return await l2.get(prefix + "short") is None

    await wait_until(gone, timeout_s=5, what="the short TTL to pass")
    assert await l2.get(prefix + "long") == b"l"


async def test_batches_keep_order_and_equal_single_calls(make_l2: MakeL2, prefix: str) -> None:
    l2 = make_l2()
    keys = [prefix + k for k in ("x", "missing", "y")]
    await l2.set_many([(keys[0], b"1", 30, ()), (keys[2], b"3", 30, (prefix + "t",))])
    assert await l2.get_many(keys) == [b"1", None, b"3"]
    assert await l2.get_many([]) == []
    await l2.set_many([])
    assert [await l2.get(k) for k in keys] == [b"1", None, b"3"]


async def test_delete_tag_removes_every_key_under_it(make_l2: MakeL2, prefix: str) -> None:
    l2 = make_l2()
    tag, other = prefix + "tag:user1", prefix + "tag:user2"
    await l2.set(prefix + "a", b"a", 30, (tag,))
    await l2.set(prefix + "b", b"b", 30, (tag, other))
    await l2.set(prefix + "c", b"c", 30, (other,))
    await l2.delete_tag(tag)
    assert await l2.get_many([prefix + "a", prefix + "b", prefix + "c"]) == [None, None, b"c"]
    await l2.delete_tag(tag)  # again: nothing left, no error
    await l2.delete_tag(prefix + "tag:none")


async def test_the_lock_is_a_lease_released_only_by_its_holder(
    make_l2: MakeL2, prefix: str
) -> None:
    one, two = make_l2(), make_l2()
    key = prefix + "lock"
    assert await one.try_lock(key, "token-1", 30) is True
    assert await two.try_lock(key, "token-2", 30) is False  # held
    assert await two.unlock(key, "token-2") is False  # not ours: still held
    assert await two.try_lock(key, "token-2", 30) is False
    assert await one.unlock(key, "token-1") is True
    assert await two.try_lock(key, "token-2", 0.2) is True

    async def expired() -> bool:
        return await one.try_lock(key, "token-3", 30) is True

    await wait_until(expired, timeout_s=5, what="the lease to expire")
    assert await two.unlock(key, "token-2") is False  # expired and taken over: not released


async def test_published_messages_reach_every_subscriber(make_l2: MakeL2, prefix: str) -> None:
    sender, one, two = make_l2(), make_l2(), make_l2()
    channel = prefix + "invalidate"
    got: dict[str, list[bytes | None]] = {"one": [], "two": []}
    await one.subscribe(channel, got["one"].append)
    await two.subscribe(channel, got["two"].append)
    await one.subscribe(prefix + "elsewhere", got["one"].append)
    await sender.publish(channel, b"k1")
    await sender.publish(prefix + "nobody", b"lost")
    await sender.publish(channel, b"k2")
    await wait_until(
        lambda: len(got["one"]) >= 2 and len(got["two"]) >= 2, timeout_s=5, what="both messages"
    )
    await asyncio.sleep(0.05)  # anything extra would have arrived by now, in order
    assert got == {"one": [b"k1", b"k2"], "two": [b"k1", b"k2"]}
