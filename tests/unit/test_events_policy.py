"""The event log's pure policy: retry backoff, topic specs, payload encoding, ids, dispatch."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenfold.errors import ConfigError, PayloadError, TopicError
from tenfold.events.base import Delivery, Event, RetryPolicy, TopicSpec, check_topic_name
from tenfold.events.dispatch import deliver
from tenfold.events.outbox import encode_payload, new_event_id

# -- RetryPolicy --------------------------------------------------------------


@given(
    attempt=st.integers(1, 60),
    r=st.floats(0.0, 1.0, exclude_max=True),
    initial=st.floats(0.001, 5.0),
    extra=st.floats(0.0, 100.0),
    multiplier=st.floats(1.0, 5.0),
)
def test_backoff_is_within_zero_and_the_capped_exponential(attempt, r, initial, extra, multiplier):
    policy = RetryPolicy(
        max_attempts=100,
        initial_backoff_s=initial,
        max_backoff_s=initial + extra,
        multiplier=multiplier,
    )
    ceiling = min(policy.max_backoff_s, initial * multiplier ** (attempt - 1))
    delay = policy.backoff_s(attempt, rand=lambda: r)
    assert 0.0 <= delay <= ceiling + 1e-12
    assert delay == pytest.approx(ceiling * r)


def test_backoff_grows_then_caps():
    policy = RetryPolicy(max_attempts=50, initial_backoff_s=0.1, max_backoff_s=3.0, multiplier=2.0)
    top = [policy.backoff_s(a, rand=lambda: 1.0) for a in range(1, 12)]
    assert top[:6] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.0])
    assert all(b >= a for a, b in itertools.pairwise(top))
    assert top[5:] == pytest.approx([3.0] * 6)
    # Full jitter: the lower bound is 0 whatever the attempt.
    assert policy.backoff_s(9, rand=lambda: 0.0) == 0.0
    # The default rand stays inside the bounds.
    for attempt in (1, 3, 10):
        for _ in range(200):
            assert 0.0 <= policy.backoff_s(attempt) <= min(3.0, 0.1 * 2 ** (attempt - 1))


def test_backoff_of_a_huge_attempt_number_is_the_cap_not_an_overflow():
    # A redelivered message can report a large attempt count; 10.0 ** 999 overflows a float.
    policy = RetryPolicy(
        max_attempts=1000, initial_backoff_s=0.5, max_backoff_s=30.0, multiplier=10
    )
    assert policy.backoff_s(1000, rand=lambda: 1.0) == pytest.approx(30.0)
    assert policy.backoff_s(100_000, rand=lambda: 0.5) == pytest.approx(15.0)


def test_gives_up_exactly_at_max_attempts():
    policy = RetryPolicy(max_attempts=3)
    assert [policy.gives_up(a) for a in (1, 2, 3, 4)] == [False, False, True, True]
    assert RetryPolicy(max_attempts=1).gives_up(1)


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"max_attempts": -3},
        {"initial_backoff_s": 0.0},
        {"initial_backoff_s": -1.0},
        {"initial_backoff_s": 5.0, "max_backoff_s": 1.0},
        {"multiplier": 0.5},
        {"multiplier": 0.0},
        {"multiplier": -2.0},
    ],
)
def test_invalid_retry_policies_are_config_errors(options):
    with pytest.raises(ConfigError):
        RetryPolicy(**options)


# -- TopicSpec ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Chat",
        "a..b",
        "",
        ".a",
        "a.",
        "1chat",
        "chat-messages",
        "chat messages",
        "chat.Messages",
        "a" * 121,
        "chat._x",
    ],
)
def test_bad_topic_names_are_topic_errors(name):
    with pytest.raises(TopicError):
        TopicSpec(name)
    with pytest.raises(TopicError):
        check_topic_name(name)


@pytest.mark.parametrize("name", ["chat", "chat.messages", "wallet.debited_v2", "a.b.c", "x" * 120])
def test_good_topic_names(name):
    assert TopicSpec(name).name == name


@pytest.mark.parametrize(
    "options",
    [
        {"partitions": 0},
        {"partitions": -1},
        {"partitions": 5000},
        {"max_age_s": 0},
        {"duplicate_window_s": -1},
        {"max_event_bytes": 100},
    ],
)
def test_bad_topic_limits_are_config_errors(options):
    with pytest.raises(ConfigError):
        TopicSpec("chat.messages", **options)


def test_partition_bounds_are_accepted():
    assert TopicSpec("t", partitions=1).partitions == 1
    assert TopicSpec("t", partitions=4096).partitions == 4096


@given(slot=st.integers(0, 4095), partitions=st.integers(1, 4096))
def test_partition_of_is_stable_and_in_range(slot, partitions):
    spec = TopicSpec("chat.messages", partitions=partitions)
    p = spec.partition_of(slot)
    assert 0 <= p < partitions
    again = TopicSpec("chat.messages", partitions=partitions)
    assert p == spec.partition_of(slot) == again.partition_of(slot)


def test_partition_of_spreads_slots_over_every_partition():
    spec = TopicSpec("t", partitions=16)
    assert {spec.partition_of(s) for s in range(16384)} == set(range(16))


# -- payload encoding -----------------------------------------------------------


def test_encode_payload_dict_is_json():
    body = encode_payload("chat.messages", {"text": "hi", "n": 1, "tags": ["a"]})
    assert isinstance(body, bytes)
    import orjson

    assert orjson.loads(body) == {"text": "hi", "n": 1, "tags": ["a"]}


def test_encode_payload_passes_bytes_through():
    assert encode_payload("t", b"\x00raw\xff") == b"\x00raw\xff"
    assert encode_payload("t", bytearray(b"ab")) == b"ab"
    assert encode_payload("t", memoryview(b"cd")) == b"cd"


def test_encode_payload_rejects_unserialisable_naming_the_topic():
    with pytest.raises(PayloadError, match=r"wallet\.debited") as info:
        encode_payload("wallet.debited", {"x": object()})
    assert info.value.topic == "wallet.debited"
    with pytest.raises(PayloadError, match=r"chat\.messages"):
        encode_payload("chat.messages", object())


# -- event ids --------------------------------------------------------------------


def test_new_event_ids_are_unique_and_time_ordered():
    ids = [new_event_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 for i in ids)
    # The time prefix never goes backwards in generation order.
    prefixes = [i[:12] for i in ids]
    assert prefixes == sorted(prefixes)
    early = new_event_id()
    time.sleep(0.003)
    late = new_event_id()
    assert early < late
    assert abs(int(late[:12], 16) / 1000 - time.time()) < 5


# -- dispatch -----------------------------------------------------------------------


def _delivery(attempt: int) -> Delivery:
    event = Event("e1", "chat.messages", "k", 7, b"{}", 0.0)
    return Delivery(event, attempt, 3, 42)


async def test_deliver_acks_a_successful_handler():
    seen: list[Delivery] = []

    async def handler(d: Delivery) -> None:
        seen.append(d)

    outcome = await deliver(handler, _delivery(1), RetryPolicy(), "g", 5.0)
    assert outcome.action == "ack"
    assert outcome.error == ""
    assert [d.attempt for d in seen] == [1]


async def test_deliver_retries_a_failure_with_a_bounded_delay():
    async def handler(d: Delivery) -> None:
        raise RuntimeError("boom")

    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.5, max_backoff_s=10.0)
    outcome = await deliver(handler, _delivery(2), policy, "g", 5.0)
    assert outcome.action == "retry"
    assert 0.0 <= outcome.delay_s <= 1.0  # attempt 2: ceiling 0.5 * 2
    assert "RuntimeError" in outcome.error and "boom" in outcome.error


async def test_deliver_dead_letters_after_max_attempts():
    async def handler(d: Delivery) -> None:
        raise ValueError("bad event")

    policy = RetryPolicy(max_attempts=3)
    assert (await deliver(handler, _delivery(2), policy, "g", 5.0)).action == "retry"
    outcome = await deliver(handler, _delivery(3), policy, "g", 5.0)
    assert outcome.action == "dead"
    assert "bad event" in outcome.error


async def test_a_handler_past_its_timeout_counts_as_a_failure():
    finished = False

    async def handler(d: Delivery) -> None:
        nonlocal finished
        await asyncio.sleep(5)
        finished = True

    start = time.perf_counter()
    outcome = await deliver(handler, _delivery(1), RetryPolicy(max_attempts=2), "g", 0.1)
    assert time.perf_counter() - start < 2
    assert outcome.action == "retry"
    assert "timed out" in outcome.error
    assert not finished
    outcome = await deliver(handler, _delivery(2), RetryPolicy(max_attempts=2), "g", 0.1)
    assert outcome.action == "dead"
    assert "timed out" in outcome.error


async def test_deliver_does_not_swallow_cancellation():
    async def handler(d: Delivery) -> None:
        await asyncio.sleep(5)

    task = asyncio.create_task(deliver(handler, _delivery(1), RetryPolicy(), "g", 10.0))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
