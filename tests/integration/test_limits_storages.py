"""One behavioural suite for every limiter storage (memory, Redis), and Redis failure policies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tenfold.errors import ConfigError, RateLimitError
from tenfold.limits import LimiterStorage, MemoryStorage, RateLimiter, Rule, from_url
from tenfold.limits.redis import OnError, RedisStorage

TEN_PER_S = Rule(limit=10, period_s=1.0)  # T = 0.1 s, burst 10

MakeStorage = Callable[..., LimiterStorage]


@pytest.fixture(params=["memory", "redis"])
async def make_storage(request: pytest.FixtureRequest) -> AsyncIterator[MakeStorage]:
    """`make_storage()` → a fresh storage; Redis ones share this test's random key prefix."""
    made: list[LimiterStorage] = []
    prefix = f"tftest:{uuid.uuid4().hex[:10]}:"
    url = request.getfixturevalue("redis_url") if request.param == "redis" else "memory://"

    def make(**options: object) -> LimiterStorage:
        if request.param == "redis":
            options.setdefault("prefix", prefix)
            options.setdefault("timeout_s", 2.0)
        storage = from_url(url, **options)
        made.append(storage)
        return storage

    yield make
    if request.param == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_timeout=5)
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    for storage in made:
        await storage.close()


async def test_burst_then_refusal(make_storage: MakeStorage) -> None:
    storage = make_storage()
    decisions = [await storage.decide("user:1", TEN_PER_S) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    refused = decisions[-1]
    assert refused.remaining == 0
    assert 0.05 < refused.retry_after_s <= 0.1 + 1e-3  # about T, less the time spent
    assert (await storage.decide("user:2", TEN_PER_S)).allowed  # keys are independent


async def test_check_now_answers_in_process_or_defers(make_storage: MakeStorage) -> None:
    storage = make_storage()
    limiter = RateLimiter({"api": "10/second burst 10 per user"}, storage)
    first = limiter.check_now("api", "u1")
    if isinstance(storage, MemoryStorage):
        assert first is not None and first.allowed and first.remaining == 9
        # the same bucket as check: nine more, then refused
        later = [await limiter.check("api", "u1") for _ in range(10)]
        assert [d.allowed for d in later] == [True] * 9 + [False]
        assert limiter.check_now("api", "u1").allowed is False  # type: ignore[union-attr]
    else:
        assert first is None  # nothing counted: the caller awaits check instead
        assert (await limiter.check("api", "u1")).remaining == 9
    with pytest.raises(RateLimitError, match="unknown rate-limit rule"):
        limiter.check_now("nope", "u1")


async def test_refill_after_waiting(make_storage: MakeStorage) -> None:
    storage = make_storage()
    for _ in range(10):
        assert (await storage.decide("k", TEN_PER_S)).allowed
    refused = await storage.decide("k", TEN_PER_S)
    assert not refused.allowed
    await asyncio.sleep(refused.retry_after_s + 0.01)
    assert (await storage.decide("k", TEN_PER_S)).allowed
    assert not (await storage.decide("k", TEN_PER_S)).allowed
    await asyncio.sleep(0.25)  # two more intervals
    assert [(await storage.decide("k", TEN_PER_S)).allowed for _ in range(3)] == [True, True, False]


async def test_cost_and_denial_costs_nothing(make_storage: MakeStorage) -> None:
    storage = make_storage()
    rule = Rule(limit=5, period_s=60.0)
    assert (await storage.decide("c", rule, 3)).remaining == 2
    denied = await storage.decide("c", rule, 3)
    assert not denied.allowed and denied.remaining == 2
    assert (await storage.decide("c", rule, 2)).allowed


async def test_decide_many_equals_sequential(make_storage: MakeStorage) -> None:
    rule = Rule(limit=3, period_s=60.0)
    other = Rule(limit=1, period_s=60.0)
    items = [("a", rule, 1), ("b", other, 1), ("a", rule, 2), ("b", other, 1), ("a", rule, 1)]
    batched = await make_storage().decide_many(items)
    sequential_storage = make_storage()  # same prefix for Redis: "s"-named keys keep apart
    sequential = [await sequential_storage.decide("s" + k, r, c) for k, r, c in items]
    assert [(d.allowed, d.remaining, d.limit) for d in batched] == [
        (d.allowed, d.remaining, d.limit) for d in sequential
    ]
    assert [d.allowed for d in batched] == [True, True, True, False, False]
    assert await make_storage().decide_many([]) == []


async def test_keys_expire(make_storage: MakeStorage) -> None:
    storage = make_storage()
    rule = Rule(limit=20, period_s=1.0)  # a full bucket 50 ms after one request
    await storage.decide("gone", rule)
    await asyncio.sleep(0.15)
    if isinstance(storage, RedisStorage):
        assert await storage._client.execute("EXISTS", storage.prefix + "gone") == 0
    else:
        assert isinstance(storage, MemoryStorage)
        assert storage.purge_expired() == 1


async def test_two_clients_share_the_limit(redis_url: str) -> None:
    prefix = f"tftest:{uuid.uuid4().hex[:10]}:"
    a = RedisStorage(redis_url, prefix=prefix, timeout_s=2.0)
    b = RedisStorage(redis_url, prefix=prefix, timeout_s=2.0)
    try:
        one = RateLimiter({"msg": "10/min per user"}, a)
        two = RateLimiter({"msg": "10/min per user"}, b)
        results = await asyncio.gather(*(limiter.check("msg", "u1") for limiter in [one, two] * 10))
        assert sum(d.allowed for d in results) == 10
        assert not (await one.check("msg", "u1")).allowed
        assert not (await two.check("msg", "u1")).allowed
    finally:
        await a._client.execute("DEL", prefix + "msg:u1")
        await a.close()
        await b.close()


async def test_script_reloaded_after_flush(redis_url: str) -> None:
    prefix = f"tftest:{uuid.uuid4().hex[:10]}:"
    storage = RedisStorage(redis_url, prefix=prefix, timeout_s=2.0)
    try:
        assert (await storage.decide("f", TEN_PER_S)).allowed
        await storage._client.execute("SCRIPT", "FLUSH")
        assert (await storage.decide("f", TEN_PER_S)).remaining == 8
        await storage._client.execute("SCRIPT", "FLUSH")
        batch = await storage.decide_many([("f", TEN_PER_S, 1), ("g", TEN_PER_S, 1)])
        assert [d.remaining for d in batch] == [7, 9]
        assert storage.failures == 0
    finally:
        await storage._client.execute("DEL", prefix + "f", prefix + "g")
        await storage.close()


async def _silent_server() -> tuple[asyncio.Server, str]:
    """A TCP server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client gives up

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"redis://127.0.0.1:{port}/0"


async def _with_unreachable(kind: str, run: Callable[[str], Awaitable[None]]) -> None:
    if kind == "dead port":
        await run("redis://127.0.0.1:1/0")
        return
    server, url = await _silent_server()
    try:
        await run(url)
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["dead port", "silent server"])
async def test_fail_open_uses_a_local_limiter(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async def run(url: str) -> None:
        storage = RedisStorage(url, timeout_s=0.2, recheck_after_s=0.3)
        try:
            started = time.monotonic()
            first = await storage.decide("u", Rule(limit=3, period_s=60.0))
            assert time.monotonic() - started < 0.5  # bounded by timeout_s
            rest = [await storage.decide("u", Rule(limit=3, period_s=60.0)) for _ in range(3)]
            assert [d.allowed for d in [first, *rest]] == [True, True, True, False]
            assert storage.failures == 4
            await asyncio.sleep(0.35)  # recheck: tries the server again, still bounded
            started = time.monotonic()
            batch = await storage.decide_many([("v", TEN_PER_S, 1)] * 2)
            assert time.monotonic() - started < 0.5
            assert [d.allowed for d in batch] == [True, True]
        finally:
            await storage.close()

    with caplog.at_level(logging.WARNING, logger="tenfold.limits.redis"):
        await _with_unreachable(kind, run)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not per request
    assert "answering from a local limiter" in warnings[0].getMessage()


@pytest.mark.parametrize("kind", ["dead port", "silent server"])
async def test_fail_closed_denies_with_retry_after(kind: str) -> None:
    async def run(url: str) -> None:
        storage = RedisStorage(url, timeout_s=0.2, on_error="closed", closed_retry_after_s=2.0)
        try:
            started = time.monotonic()
            decision = await storage.decide("u", TEN_PER_S)
            assert time.monotonic() - started < 0.5
            assert not decision.allowed
            assert decision.retry_after_s == 2.0 and decision.remaining == 0
            batch = await storage.decide_many([("u", TEN_PER_S, 1)])
            assert not batch[0].allowed
        finally:
            await storage.close()

    await _with_unreachable(kind, run)


async def test_recovers_when_redis_answers_again(redis_url: str) -> None:
    prefix = f"tftest:{uuid.uuid4().hex[:10]}:"
    now = [0.0]
    storage = RedisStorage(redis_url, prefix=prefix, timeout_s=2.0, clock=lambda: now[0])
    try:
        storage._mark_down(OSError("simulated"))
        assert (await storage.decide("r", TEN_PER_S)).allowed
        assert storage.failures == 1  # answered locally while marked down
        now[0] = 10.0
        assert (await storage.decide("r", TEN_PER_S)).remaining == 9  # Redis again, fresh key
        assert storage.failures == 1
    finally:
        await storage._client.execute("DEL", prefix + "r")
        await storage.close()


def test_from_url_and_settings_validation() -> None:
    assert isinstance(from_url("memory://?max_keys=5"), MemoryStorage)
    with pytest.raises(ConfigError, match="unknown scheme in 'mongo://x'"):
        from_url("mongo://x")
    with pytest.raises(ConfigError, match="max_keys must be an integer"):
        from_url("memory://?max_keys=lots")
    with pytest.raises(ConfigError, match='on_error must be "open" or "closed"'):
        RedisStorage("redis://:secret@127.0.0.1:6379/0", on_error="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"redis limiter at redis://:\*\*\*@127.0.0.1") as info:
        RedisStorage("redis://:secret@127.0.0.1:6379/0", timeout_s=0)
    assert "secret" not in str(info.value)


async def test_coalesced_decisions_stay_atomic_per_key(make_storage: MakeStorage) -> None:
    storage = make_storage()
    rule = Rule(limit=50, period_s=60.0)  # burst 50
    decisions = await asyncio.gather(*(storage.decide("hot", rule) for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 50
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))


async def test_concurrent_decides_share_round_trips(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"tftest:{uuid.uuid4().hex[:10]}:"
    storage = RedisStorage(redis_url, prefix=prefix, timeout_s=2.0)
    in_flight: list[int] = []  # calls awaiting a reply on the connection, at each send
    try:
        assert (await storage.decide("warm", TEN_PER_S)).allowed  # connects, loads the script
        conn = storage._client._slots[0]
        assert conn is not None
        send = conn.send

        def counted_send(data: bytes, waiter: Any) -> None:
            send(data, waiter)
            in_flight.append(len(conn.waiters))

        monkeypatch.setattr(conn, "send", counted_send)
        keys = [f"k{i}" for i in range(200)]

        async def worker(chunk: list[str]) -> list[bool]:
            return [(await storage.decide(key, TEN_PER_S)).allowed for key in chunk]

        results = await asyncio.gather(*(worker(keys[i::20]) for i in range(20)))
        assert all(all(allowed) for allowed in results)
        assert len(in_flight) == 200 and storage.failures == 0
        assert max(in_flight) >= 10  # 20 callers share the socket, not one round trip each
    finally:
        await storage._client.execute("DEL", *(prefix + k for k in ["warm", *keys]))
        await storage.close()


async def test_cancelled_caller_does_not_break_the_batch(redis_url: str) -> None:
    prefix = f"tftest:{uuid.uuid4().hex[:10]}:"
    storage = RedisStorage(redis_url, prefix=prefix, timeout_s=2.0)
    try:
        tasks = [asyncio.create_task(storage.decide(f"c{i}", TEN_PER_S)) for i in range(30)]
        await asyncio.sleep(0)  # the first is in flight, the rest queued
        for task in tasks[5:10]:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(d, asyncio.CancelledError) for d in done[5:10])
        assert all(d.allowed for d in done[:5] + done[10:])  # type: ignore[union-attr]
        assert storage.failures == 0
        assert (await storage.decide("after", TEN_PER_S)).allowed
    finally:
        await storage._client.execute(
            "DEL", *(prefix + f"c{i}" for i in range(30)), prefix + "after"
        )
        await storage.close()


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_redis_down_policies_under_concurrency(on_error: OnError) -> None:
    storage = RedisStorage(
        "redis://127.0.0.1:1/0", timeout_s=0.2, on_error=on_error, closed_retry_after_s=2.0
    )
    rule = Rule(limit=30, period_s=60.0)
    try:
        started = time.monotonic()
        decisions = await asyncio.gather(*(storage.decide("u", rule) for _ in range(50)))
        assert time.monotonic() - started < 0.5
        assert storage.failures == 50
        if on_error == "open":  # one local limiter, still exact
            assert sum(d.allowed for d in decisions) == 30
        else:
            assert not any(d.allowed for d in decisions)
            assert {d.retry_after_s for d in decisions} == {2.0}
    finally:
        await storage.close()


async def test_silent_server_under_concurrency_is_bounded() -> None:
    server, url = await _silent_server()
    storage = RedisStorage(url, timeout_s=0.2)
    try:
        started = time.monotonic()
        decisions = await asyncio.gather(*(storage.decide("u", TEN_PER_S) for _ in range(50)))
        assert time.monotonic() - started < 0.6
        assert sum(d.allowed for d in decisions) == 10 and storage.failures == 50
    finally:
        await storage.close()
        server.close()


async def test_server_going_silent_after_load_is_bounded() -> None:
    """The hot path (script loaded, connected) is bounded by the client's own timer."""
    from tenfold.limits.redis import SCRIPT_SHA

    held: list[asyncio.StreamWriter] = []

    async def answer_load_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"SCRIPT")  # SCRIPT LOAD: answer it, then never again
            writer.write(b"$40\r\n%s\r\n" % SCRIPT_SHA.encode())
            await reader.read()

    server = await asyncio.start_server(answer_load_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    now = [0.0]
    storage = RedisStorage(
        f"redis://127.0.0.1:{port}/0", timeout_s=0.2, recheck_after_s=60, clock=lambda: now[0]
    )
    try:
        started = time.monotonic()
        first = await storage.decide("u", TEN_PER_S)  # loads, then the EVALSHA times out
        assert storage.failures == 1 and first.allowed
        now[0] += 61  # recheck_after_s has passed: the breaker lets one probe through
        storage._loaded = True  # the hot path: no SCRIPT LOAD, only the EVALSHA
        async with asyncio.timeout(2.0):  # a failure, not a hang, if unbounded
            decisions = await asyncio.gather(*(storage.decide("u", TEN_PER_S) for _ in range(20)))
        assert time.monotonic() - started < 0.8
        assert storage.failures == 21  # answered locally: 9 left, plus what refilled
        assert (
            9 <= sum(d.allowed for d in decisions) <= 9 + round((time.monotonic() - started) / 0.1)
        )
    finally:
        await storage.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
