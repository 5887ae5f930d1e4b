"""JSON logs (structlog over stdlib logging) carrying the request id and trace ids.

configure_logging("json", "INFO")     # or "console" for people at a terminal

Every record, from tenfold, the app or a library, leaves as one JSON line with
`timestamp`, `level`, `logger`, `event`, and `request_id` / `trace_id` /
`span_id` when it was logged while handling a request or inside a span.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from tenfold.errors import ConfigError
from tenfold.observe import tracing

__all__ = ["configure_logging", "request_id_var"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tenfold_request_id", default=None
)


def _add_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    rid = request_id_var.get()
    if rid is not None:
        event.setdefault("request_id", rid)
    ids = tracing.trace_ids()
    if ids is not None:
        event.setdefault("trace_id", ids[0])
        event.setdefault("span_id", ids[1])
    return event


def _dumps(data: Any, **_: Any) -> str:
    return orjson.dumps(data, default=str).decode()


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Route every stdlib log record through structlog's JSON (or console) renderer.

    Raises:
        ConfigError: an unknown format or level.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigError("TENFOLD_LOG_LEVEL", f"unknown level {level!r}; use DEBUG, INFO, ...")
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        raise ConfigError("TENFOLD_LOG_FORMAT", f"unknown format {fmt!r}; use json or console")
    shared: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_ids,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
