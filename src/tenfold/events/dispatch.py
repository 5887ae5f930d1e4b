"""What happens to one delivery: run the handler, then ack, retry later, or dead-letter.

Pure policy over the handler's result, shared by every backend, so the
retry/DLQ semantics are the same on the memory backend and on JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from opentelemetry.trace import SpanKind

from tenfold.errors import BrokerUnavailable, ShardTimeout, ShardUnavailable
from tenfold.events.base import Delivery, Handler, RetryPolicy
from tenfold.observe import metrics, tracing

__all__ = ["Outcome", "deliver"]

log = logging.getLogger("tenfold.events.consumer")


@dataclass(frozen=True, slots=True)
class Outcome:
    """`ack`, or `retry` after `delay_s`, or `dead` with the error text."""

    action: str
    delay_s: float = 0.0
    error: str = ""


ACK = Outcome("ack")
_UNTRACED = contextlib.nullcontext()
_INFRASTRUCTURE = (ShardUnavailable, ShardTimeout, BrokerUnavailable)


async def deliver(
    handler: Handler, delivery: Delivery, policy: RetryPolicy, group: str, timeout_s: float
) -> Outcome:
    """Run `handler` on `delivery` (bounded by `timeout_s`) and decide what follows."""
    topic = delivery.event.topic
    start = time.perf_counter()
    bound = _Bound(timeout_s)
    try:
        with (
            tracing.span(
                f"consume {topic}",
                {"messaging.destination.name": topic, "messaging.consumer.group.name": group},
                parent=tracing.extract(delivery.event.headers),
                kind=SpanKind.CONSUMER,
            )
            if tracing.enabled()  # else no name, attributes or context to build per event
            else _UNTRACED
        ):
            try:
                await handler(delivery)
            except asyncio.CancelledError:
                if bound.ours():
                    raise TimeoutError from None
                raise
            finally:
                bound.handle.cancel()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, TimeoutError) and bound.expired:
            error = f"handler timed out after {timeout_s:g} s"
        else:
            error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, _INFRASTRUCTURE):
            # A shard or broker outage is not a poison event: retry (bounded
            # backoff) without spending attempts, so an outage never dead-letters
            # events whose effects would then be lost.
            delay = policy.backoff_s(min(delivery.attempt, 8))
            log.warning(
                "%s/%s: event %s waits for %s; retrying in %.2fs",
                topic,
                group,
                delivery.event.id,
                error,
                delay,
            )
            metrics.child(metrics.events_handled, topic, group, "retry").inc()
            return Outcome("retry", delay_s=delay, error=error)
        if policy.gives_up(delivery.attempt):
            log.error(
                "%s/%s: event %s dead-lettered after %d attempts: %s",
                topic,
                group,
                delivery.event.id,
                delivery.attempt,
                error,
            )
            metrics.child(metrics.events_handled, topic, group, "dead_letter").inc()
            return Outcome("dead", error=error)
        delay = policy.backoff_s(delivery.attempt)
        log.warning(
            "%s/%s: event %s attempt %d failed (%s); retrying in %.2fs",
            topic,
            group,
            delivery.event.id,
            delivery.attempt,
            error,
            delay,
        )
        metrics.child(metrics.events_handled, topic, group, "retry").inc()
        return Outcome("retry", delay_s=delay, error=error)
    finally:
        metrics.child(metrics.handler_seconds, topic, group).observe(time.perf_counter() - start)
    metrics.child(metrics.events_handled, topic, group, "ok").inc()
    return ACK


class _Bound:
    """`asyncio.timeout` for one handler call, at a third of its cost per event
    (one timer handle; measured 1.5 vs 4.7 µs): on expiry the task is cancelled,
    and `ours()` tells that cancellation from any other, as `Timeout` does."""

    __slots__ = ("_cancelling", "_task", "expired", "handle")

    def __init__(self, timeout_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None, "deliver runs in a task"
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self.handle = asyncio.get_running_loop().call_later(timeout_s, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def ours(self) -> bool:
        """Whether the CancelledError being handled is this bound's expiry alone."""
        return self.expired and self._task.uncancel() <= self._cancelling
