"""OpenTelemetry tracing: one span per HTTP request, shard query and consumed event.

configure("console")                  # or "memory" (tests), "otlp" (needs the exporter
                                      # package), "none" (default: no spans, no cost)
with span("db.query", {"tenfold.shard": "s1"}): ...
headers = inject({})                  # W3C traceparent into event headers
with span("consume arena.x", parent=extract(event.headers)): ...

Trace context crosses the event backbone in the event's headers, so a trace
runs from the HTTP request through the shard transaction into every consumer.
When tracing is off, `span` returns a shared null context: the hot paths pay
one global read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tenfold.errors import ConfigError

__all__ = ["child_span", "configure", "enabled", "extract", "inject", "span", "trace_ids"]

_state: dict[str, Any] = {"enabled": False, "tracer": None, "provider": None}
_NULL = contextlib.nullcontext()


def enabled() -> bool:
    """Whether spans are recorded."""
    return bool(_state["enabled"])


def configure(exporter: str = "none", *, service: str = "tenfold") -> SpanExporter | None:
    """Install a tracer provider with `exporter`; returns the exporter (None for "none").

    Args:
        exporter: "none", "console", "memory" (spans kept for tests) or "otlp".
        service: the `service.name` resource attribute.

    Raises:
        ConfigError: an unknown exporter, or "otlp" without its package.
    """
    if exporter == "none":
        _state.update(enabled=False, tracer=None)
        return None
    from opentelemetry.sdk.resources import Resource

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    chosen: SpanExporter
    if exporter == "console":
        chosen = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(chosen))
    elif exporter == "memory":
        chosen = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(chosen))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError as exc:
            raise ConfigError(
                "TENFOLD_TRACE_EXPORTER",
                "otlp needs `pip install opentelemetry-exporter-otlp-proto-http`",
            ) from exc
        chosen = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(chosen))
    else:
        raise ConfigError(
            "TENFOLD_TRACE_EXPORTER",
            f"unknown exporter {exporter!r}; use none, console, memory or otlp",
        )
    _state.update(enabled=True, provider=provider, tracer=provider.get_tracer("tenfold"))
    return chosen


def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    parent: otel_context.Context | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
) -> contextlib.AbstractContextManager[Any]:
    """A current span named `name` (a null context when tracing is off)."""
    if not _state["enabled"]:
        return _NULL
    tracer: trace.Tracer = _state["tracer"]
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    return tracer.start_as_current_span(name, context=parent, kind=kind, attributes=clean)


def child_span(
    name: str, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Like `span`, but only inside an existing trace (background polls stay silent)."""
    if not _state["enabled"] or not trace.get_current_span().get_span_context().is_valid:
        return _NULL
    return span(name, attributes)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (`traceparent`) to `headers`; returns them."""
    if _state["enabled"]:
        propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str]) -> otel_context.Context | None:
    """The trace context carried in `headers`, or None."""
    if not _state["enabled"] or "traceparent" not in headers:
        return None
    return propagate.extract(dict(headers))


def trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span as hex, for log lines; None if none."""
    if not _state["enabled"]:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
