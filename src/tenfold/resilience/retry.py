"""Bounded retries with full jitter, for idempotent operations only.

Built on tenacity (`AsyncRetrying`, `stop_after_attempt`,
`wait_random_exponential`). Chosen because it is the well-kept standard for
retries in Python (Apache-2.0, maintained since 2016, typed, used by
OpenStack, LangChain and the Google/OpenAI SDKs), has native asyncio support
and an injectable `sleep`, and implements the AWS "full jitter" backoff we
want in `wait_random_exponential`: the wait before retry k is uniform in
``[0, min(max_s, initial_s * 2 ** (k - 1))]``. Hand-rolling this would repeat
its subtle parts (attempt accounting, re-raising the last error) for no gain.

Only wrap operations that are safe to run twice: reads, upserts keyed by an
id, writes guarded by an idempotency key. Only the exception types in
`retry_on` are retried (by default, unreachable or timed-out I/O); everything
else (a constraint violation, a bad input, `CircuitOpen`, `BulkheadFull`)
propagates at once. After the last attempt the last error is re-raised as is,
never wrapped in tenacity's `RetryError`.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from tenfold.errors import BrokerUnavailable, ConfigError, ShardTimeout, ShardUnavailable
from tenfold.observe import metrics

__all__ = ["DEFAULT_RETRY_ON", "idempotent", "retry_idempotent"]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,  # includes DeadlineExceeded
    ShardUnavailable,
    ShardTimeout,
    BrokerUnavailable,
)
"""Transient I/O failures: worth another try if the operation is idempotent."""

Sleep = Callable[[float], Awaitable[None]]


def _check(attempts: int, initial_s: float, max_s: float) -> None:
    if attempts < 1:
        raise ConfigError("attempts", f"must be >= 1, got {attempts}")
    if not (math.isfinite(initial_s) and initial_s > 0):
        raise ConfigError("initial_s", f"must be a finite number > 0, got {initial_s}")
    if not (math.isfinite(max_s) and max_s >= initial_s):
        raise ConfigError("max_s", f"must be finite and >= initial_s ({initial_s}), got {max_s}")


async def retry_idempotent(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    initial_s: float = 0.05,
    max_s: float = 2.0,
    retry_on: tuple[type[BaseException], ...] = DEFAULT_RETRY_ON,
    what: str = "call",
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Await `fn()` up to `attempts` times, with full-jitter backoff between tries.

    Args:
        fn: a zero-argument async callable (use a lambda or `functools.partial`);
            it must be idempotent.
        attempts: total tries, the first included (>= 1).
        initial_s: backoff scale: the wait before retry k is uniform in
            [0, min(max_s, initial_s * 2 ** (k - 1))].
        max_s: cap on the backoff ceiling.
        retry_on: exception types that are retried; others propagate at once.
        what: names the operation in the retries metric (a bounded label).
        sleep: the sleep to use between tries; a fake in tests.

    Returns:
        What `fn` returned on its first successful try.

    Raises:
        ConfigError: a bound is invalid.
        BaseException: the last error of `fn` once attempts are used up, or
            the first error not in `retry_on`.
    """
    _check(attempts, initial_s, max_s)

    def count_retry(state: RetryCallState) -> None:
        metrics.retries.labels(what).inc()

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=initial_s, max=max_s),
        retry=retry_if_exception_type(retry_on),
        sleep=sleep,
        before_sleep=count_retry,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity re-raises once attempts are used up")


def idempotent(
    *,
    attempts: int = 3,
    initial_s: float = 0.05,
    max_s: float = 2.0,
    retry_on: tuple[type[BaseException], ...] = DEFAULT_RETRY_ON,
    what: str | None = None,
    sleep: Sleep = asyncio.sleep,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an idempotent async function so that calls are retried.

    Args:
        attempts: total tries, the first included.
        initial_s: backoff scale (see `retry_idempotent`).
        max_s: cap on the backoff ceiling.
        retry_on: exception types that are retried.
        what: names the operation in the retries metric; the function's
            qualified name by default.
        sleep: the sleep to use between tries; a fake in tests.
    """
    _check(attempts, initial_s, max_s)

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        name: str = what or str(getattr(fn, "__qualname__", "call"))

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await retry_idempotent(
                lambda: fn(*args, **kwargs),
                attempts=attempts,
                initial_s=initial_s,
                max_s=max_s,
                retry_on=retry_on,
                what=name,
                sleep=sleep,
            )

        return wrapper

    return decorate
