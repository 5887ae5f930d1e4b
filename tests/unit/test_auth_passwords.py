"""Password hashing: argon2id round trip, policy, rehash, malformed hashes, off-loop, bounded."""

from __future__ import annotations

import asyncio
import time

import pytest

from tenfold.errors import BulkheadFull, ConfigError, PasswordHashInvalid, PasswordPolicyError
from tenfold.gateway.auth import (
    TESTING,
    PasswordHasher,
    PasswordParams,
    check_password_policy,
)


@pytest.fixture
def hasher() -> PasswordHasher:
    return PasswordHasher(TESTING)


async def test_round_trip_and_argon2id(hasher: PasswordHasher) -> None:
    stored = await hasher.hash("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert "correct horse" not in stored
    assert await hasher.verify(stored, "correct horse battery") is True
    # Salted: the same password hashes differently each time.
    assert stored != await hasher.hash("correct horse battery")


async def test_wrong_password_is_false_not_an_error(hasher: PasswordHasher) -> None:
    stored = await hasher.hash("correct horse battery")
    assert await hasher.verify(stored, "correct horse batterY") is False
    assert await hasher.verify(stored, "") is False
    assert await hasher.verify(stored, "x" * 100_000) is False  # refused without hashing


async def test_default_parameters_follow_owasp() -> None:
    params = PasswordParams()
    assert params.time_cost >= 2 and params.memory_kib >= 19 * 1024
    assert params.parallelism == 1
    stored = await PasswordHasher().hash("a fine password")
    assert "m=19456,t=2,p=1" in stored


async def test_needs_rehash_on_parameter_change(hasher: PasswordHasher) -> None:
    stored = await hasher.hash("correct horse battery")
    assert hasher.needs_rehash(stored) is False
    stronger = PasswordHasher(PasswordParams(time_cost=2, memory_kib=2048))
    assert stronger.needs_rehash(stored) is True
    # Still verifies under the new parameters: they are read from the hash.
    assert await stronger.verify(stored, "correct horse battery") is True
    assert stronger.needs_rehash(await stronger.hash("correct horse battery")) is False


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("short", "at least 8"),
        ("x" * 129, "at most 128"),
        (" " * 12, "whitespace"),
        ("\t\n  \r\n  ", "whitespace"),
        ("abc\x00defgh", "NUL"),
        (12345678, "string"),
    ],
)
async def test_policy_errors_are_typed_and_clear(
    hasher: PasswordHasher, password: object, fragment: str
) -> None:
    with pytest.raises(PasswordPolicyError) as info:
        await hasher.hash(password)  # type: ignore[arg-type]
    assert fragment in info.value.reason
    assert info.value.http_status == 422
    assert isinstance(info.value, ValueError)


def test_policy_accepts_boundaries() -> None:
    assert check_password_policy("x" * 8) == "x" * 8
    assert check_password_policy("é" * 128) == "é" * 128
    assert check_password_policy("  padded  ") == "  padded  "


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "not a hash",
        "$argon2id$v=19$m=1024,t=1,p=1$garbage",
        "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$",
        "$2b$12$KIXQJ4lM1eXyZ8Jp3Kf9uO9hH4eQ1J8y1m5fL1l6Jr8b2X5cW1r7a",  # bcrypt
    ],
)
async def test_malformed_stored_hash_is_a_typed_error(hasher: PasswordHasher, stored: str) -> None:
    with pytest.raises(PasswordHashInvalid) as info:
        await hasher.verify(stored, "correct horse battery")
    assert "correct horse" not in str(info.value)
    assert info.value.http_status == 500


def test_needs_rehash_on_malformed_hash(hasher: PasswordHasher) -> None:
    with pytest.raises(PasswordHashInvalid):
        hasher.needs_rehash("$argon2id$nonsense")


async def test_verify_absent_spends_time_and_says_false(hasher: PasswordHasher) -> None:
    assert await hasher.verify_absent("whatever password") is False


async def test_hashing_does_not_block_the_event_loop() -> None:
    # Expensive enough to take tens of milliseconds per hash.
    slow = PasswordHasher(PasswordParams(time_cost=3, memory_kib=32 * 1024))
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    stored = await slow.hash("correct horse battery")
    assert await slow.verify(stored, "correct horse battery")
    elapsed = time.perf_counter() - start
    stop.set()
    await task
    # A blocked loop would tick about once; a free one ticks throughout.
    assert elapsed > 0.01
    assert ticks >= 5, (ticks, elapsed)


async def test_concurrency_is_bounded_and_waiting_is_bounded() -> None:
    limited = PasswordHasher(TESTING, max_concurrent=1, max_wait_s=0.001)
    slow = PasswordHasher(PasswordParams(time_cost=4, memory_kib=32 * 1024), max_concurrent=1)
    # Occupy the single turn of `limited` with a slow hash run through it.
    limited._ph = slow._ph  # the same slow work, behind `limited`'s one turn
    first = asyncio.create_task(limited.hash("correct horse battery"))
    await asyncio.sleep(0.005)
    with pytest.raises(BulkheadFull):
        await limited.hash("another password")
    assert (await first).startswith("$argon2id$")
    # The turn is free again.
    limited.max_wait_s = 5.0
    assert await limited.hash("another password")


async def test_cancelled_caller_keeps_its_turn_until_the_thread_ends() -> None:
    hasher = PasswordHasher(PasswordParams(time_cost=4, memory_kib=32 * 1024), max_concurrent=1)
    task = asyncio.create_task(hasher.hash("correct horse battery"))
    await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hasher._turns.locked()  # the thread still runs: its memory is still in use
    for _ in range(500):
        if not hasher._turns.locked():
            break
        await asyncio.sleep(0.01)
    assert not hasher._turns.locked()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"params": PasswordParams(time_cost=0)},
        {"params": PasswordParams(memory_kib=4)},
        {"params": PasswordParams(salt_len=8)},
        {"max_concurrent": 0},
        {"max_wait_s": 0},
        {"min_length": 10, "max_length": 5},
    ],
)
def test_bad_configuration_is_a_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PasswordHasher(**kwargs)  # type: ignore[arg-type]
