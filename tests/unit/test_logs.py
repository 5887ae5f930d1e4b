"""JSON log lines carry the request id and the trace ids."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest

from tenfold.errors import ConfigError
from tenfold.observe import tracing
from tenfold.observe.logs import configure_logging, request_id_var


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level
    tracing.configure("none")


def test_json_lines_carry_request_and_trace_ids(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO")
    tracing.configure("memory")
    token = request_id_var.set("req-42")
    try:
        with tracing.span("work"):
            logging.getLogger("tenfold.test").info("inside %s", "a span")
    finally:
        request_id_var.reset(token)
    logging.getLogger("tenfold.test").warning("outside")
    lines = [orjson.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    inside, outside = lines[-2], lines[-1]
    assert inside["event"] == "inside a span"
    assert inside["request_id"] == "req-42"
    assert len(inside["trace_id"]) == 32 and len(inside["span_id"]) == 16
    assert inside["level"] == "info" and inside["logger"] == "tenfold.test"
    assert "request_id" not in outside and "trace_id" not in outside
    assert outside["level"] == "warning"


def test_bad_format_or_level_is_a_config_error(restore_logging: None) -> None:
    with pytest.raises(ConfigError, match="TENFOLD_LOG_FORMAT"):
        configure_logging("xml", "INFO")
    with pytest.raises(ConfigError, match="TENFOLD_LOG_LEVEL"):
        configure_logging("json", "LOUD")
