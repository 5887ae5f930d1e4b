"""tenfold.resp against a real Redis: pipelining order, errors, timeouts, lost connections."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tenfold.resp import RespClient, RespConnectionError, RespReplyError, pack


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A random key prefix for this test; its keys are deleted afterwards."""
    prefix = f"tftest:{uuid.uuid4().hex[:10]}:"
    yield prefix
    for db in (0, 3):
        client = RespClient.from_url(_with_db(redis_url, db))
        keys = await client.execute("KEYS", prefix + "*")
        if keys:
            await client.execute("DEL", *keys)
        await client.close()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RespClient]:
    client = RespClient.from_url(redis_url, connect_timeout_s=2.0)
    yield client
    await client.close()


def _with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def _with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def test_pack_encodes_each_type() -> None:
    assert pack(("SET", b"k\r\n", 12, 0.5)) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n0.5\r\n"
    )
    assert pack(("ECHO", "é")) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError, match="must be str, bytes, int or float"):
        pack(("SET", "k", None))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pack(("SET", "k", True))


async def test_replies_match_callers_under_200_concurrent_calls(
    client: RespClient, prefix: str
) -> None:
    async def call(i: int) -> tuple[object, object]:
        if i % 3 == 0:  # mix single calls and pipelines on the same socket
            return i, await client.pipeline([("ECHO", f"p{i}"), ("INCRBY", prefix + "n", i)])
        return i, await client.execute("ECHO", f"v{i}")

    await client.execute("PING")
    conn = client._slots[0]
    assert conn is not None
    deepest = 0
    send = conn.send

    def counted(data: bytes, waiter: object) -> None:
        nonlocal deepest
        send(data, waiter)  # type: ignore[arg-type]
        deepest = max(deepest, len(conn.waiters))

    conn.send = counted  # type: ignore[method-assign]
    results = await asyncio.gather(*(call(i) for i in range(200)))
    for i, reply in results:
        if i % 3 == 0:
            assert isinstance(reply, list) and reply[0] == f"p{i}".encode()
        else:
            assert reply == f"v{i}".encode()
    assert deepest > 100  # they were all in flight on one connection together
    assert await client.execute("GET", prefix + "n") == str(sum(range(0, 200, 3))).encode()


async def test_error_replies_are_per_pipeline_item(client: RespClient, prefix: str) -> None:
    key = prefix + "s"
    replies = await client.pipeline(
        [
            ("SET", key, "text"),
            ("INCR", key),
            ("GET", key),
            ("EVALSHA", "0" * 40, 0),
            ("ECHO", "last"),
        ]
    )
    assert replies[0] == b"OK" and replies[2] == b"text" and replies[4] == b"last"
    assert isinstance(replies[1], RespReplyError)
    assert replies[1].message.startswith("ERR value is not an integer")
    assert isinstance(replies[3], RespReplyError) and replies[3].message.startswith("NOSCRIPT")
    with pytest.raises(RespReplyError, match="WRONGTYPE") as info:
        await client.execute("LPUSH", key, "x")
    assert info.value.message.startswith("WRONGTYPE")
    assert await client.execute("ECHO", "still in step") == b"still in step"
    assert await client.pipeline([]) == []


async def test_a_timed_out_caller_does_not_desync_later_callers(
    client: RespClient, prefix: str
) -> None:
    # BLPOP holds the connection's queue on the server for 0.3 s, then answers nil.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await client.execute("BLPOP", prefix + "empty", 0.3)
    later = await asyncio.gather(
        client.execute("ECHO", "a"),
        client.pipeline([("ECHO", "b"), ("ECHO", "c")]),
        client.execute("ECHO", "d"),
    )
    assert later == [b"a", [b"b", b"c"], b"d"]  # not the nil meant for the BLPOP
    cancelled = asyncio.create_task(client.pipeline([("BLPOP", prefix + "empty", 0.2)] * 2))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    assert await client.execute("ECHO", "e") == b"e"


async def test_killed_connection_fails_pending_calls_then_reconnects(
    client: RespClient, redis_url: str, prefix: str
) -> None:
    first_id = await client.execute("CLIENT", "ID")
    pending = [
        asyncio.create_task(client.execute("BLPOP", prefix + "never", 5)),
        asyncio.create_task(client.pipeline([("ECHO", "x"), ("BLPOP", prefix + "never", 5)])),
    ]
    await asyncio.sleep(0.05)
    killer = RespClient.from_url(redis_url)
    try:
        # by id: other tests and people share this server
        assert await killer.execute("CLIENT", "KILL", "ID", first_id) == 1
    finally:
        await killer.close()
    started = time.monotonic()
    async with asyncio.timeout(2.0):
        results = await asyncio.gather(*pending, return_exceptions=True)
    assert time.monotonic() - started < 1.0
    for result in results:
        assert isinstance(result, RespConnectionError) and isinstance(result, ConnectionError)
        assert "connection lost" in str(result)
    assert await client.execute("ECHO", "back") == b"back"
    assert await client.execute("CLIENT", "ID") != first_id  # a new connection


async def test_db_is_selected_from_the_url(redis_url: str, prefix: str) -> None:
    in_db3 = RespClient.from_url(_with_db(redis_url, 3))
    in_db0 = RespClient.from_url(_with_db(redis_url, 0))
    try:
        await in_db3.execute("SET", prefix + "where", "three")
        assert await in_db3.execute("GET", prefix + "where") == b"three"
        assert await in_db0.execute("EXISTS", prefix + "where") == 0
        assert b" db=3 " in await in_db3.execute("CLIENT", "INFO")
        first_id = await in_db3.execute("CLIENT", "ID")
        await in_db0.execute("CLIENT", "KILL", "ID", first_id)
        await asyncio.sleep(0.05)  # the loss reaches the client
        assert await in_db3.execute("GET", prefix + "where") == b"three"  # SELECTed again
        assert await in_db3.execute("CLIENT", "ID") != first_id
    finally:
        await in_db3.close()
        await in_db0.close()


async def test_auth_from_the_url(redis_url: str, prefix: str) -> None:
    user, password = f"tftest-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = RespClient.from_url(redis_url)
    await admin.execute("ACL", "SETUSER", user, "on", f">{password}", f"~{prefix}*", "+@all")
    try:
        authed = RespClient.from_url(_with_user(redis_url, user, password))
        try:
            assert await authed.execute("ACL", "WHOAMI") == user.encode()
            assert await authed.execute("SET", prefix + "a", 1) == b"OK"
            with pytest.raises(RespReplyError, match="NOPERM"):
                await authed.execute("GET", "not-my-prefix")
        finally:
            await authed.close()
        wrong = RespClient.from_url(_with_user(redis_url, user, "wrong-" + password))
        try:
            with pytest.raises(RespConnectionError, match="AUTH failed: WRONGPASS") as info:
                await wrong.execute("PING")
            assert password not in str(info.value) and "***" in str(info.value)
        finally:
            await wrong.close()
    finally:
        await admin.execute("ACL", "DELUSER", user)
        await admin.close()


async def test_dead_port_raises_a_typed_error_within_the_timeout() -> None:
    client = RespClient.from_url("redis://:s3cret@127.0.0.1:1/0", connect_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(RespConnectionError) as info:
        await client.execute("PING")
    assert time.monotonic() - started < 0.5
    assert "127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)
    # concurrent callers share the failed attempt; a later call tries again
    results = await asyncio.gather(
        *(client.execute("PING") for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, RespConnectionError) for r in results)
    await client.close()


async def test_silent_server_is_bounded_by_the_connect_timeout() -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient.from_url(f"redis://:s3cret@127.0.0.1:{port}/2", connect_timeout_s=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(RespConnectionError, match=f"127.0.0.1:{port}.*within 0.2 s") as info:
            async with asyncio.timeout(2.0):  # a failure, not a hang, if unbounded
                await client.execute("PING")  # AUTH is never answered
        assert 0.15 < time.monotonic() - started < 0.5
        assert "s3cret" not in str(info.value)
    finally:
        await client.close()
        for writer in held:
            writer.close()
        server.close()


async def test_close_fails_pending_calls(client: RespClient, prefix: str) -> None:
    await client.execute("PING")
    pending = asyncio.create_task(client.execute("BLPOP", prefix + "never", 5))
    await asyncio.sleep(0.01)
    await client.close()
    with pytest.raises(RespConnectionError, match="closed"):
        await pending


async def test_timeout_s_bounds_each_call_and_keeps_order(client: RespClient, prefix: str) -> None:
    await client.execute("PING")
    started = time.monotonic()
    slow = asyncio.gather(
        client.execute("BLPOP", prefix + "empty", 0.5, timeout_s=0.1),  # expires
        client.pipeline([("BLPOP", prefix + "empty", 0.2)], timeout_s=0.05),  # expires first
        client.execute("ECHO", "patient", timeout_s=1.2),  # waits behind both BLPOPs
        return_exceptions=True,
    )
    short, batch, patient = await slow
    assert isinstance(short, TimeoutError) and isinstance(batch, TimeoutError)
    assert patient == b"patient"
    assert 0.6 < time.monotonic() - started < 1.2  # the server's 0.5 + 0.2 s, not longer
    assert await client.execute("ECHO", "next", timeout_s=0.3) == b"next"
    await asyncio.sleep(started + 1.3 - time.monotonic())  # every deadline has passed
    assert client._timers == {} and client._deadlines == {}  # nothing kept, no timer left


def test_from_url_parses_credentials_db_and_tls() -> None:
    from tenfold.errors import ConfigError

    tls = RespClient.from_url("rediss://app:p%40ss@cache.example:6380/2")
    assert (tls.host, tls.port, tls.db) == ("cache.example", 6380, 2)
    assert (tls.username, tls.password) == ("app", "p@ss")
    assert tls.ssl_context is not None and "p@ss" not in tls.where
    plain = RespClient.from_url("redis://127.0.0.1")
    assert (plain.port, plain.db, plain.password, plain.ssl_context) == (6379, 0, None, None)
    with pytest.raises(ConfigError, match="redis:// or rediss://"):
        RespClient.from_url("http://127.0.0.1:6379")
    with pytest.raises(ConfigError, match=r"bad port or db number") as info:
        RespClient.from_url("redis://:secret@127.0.0.1:6379/zero")
    assert "secret" not in str(info.value)
