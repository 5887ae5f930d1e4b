"""One trace from the HTTP request through the shard queries into the event consumer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from apps.arena.app import create_app
from tenfold.observe import tracing
from tests.integration.support import wait_until


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.configure("memory")
    assert isinstance(exporter, InMemorySpanExporter)
    yield exporter
    tracing.configure("none")


async def test_request_query_event_and_consumer_share_one_trace(
    make_settings: Any, spans: InMemorySpanExporter
) -> None:
    app = create_app(make_settings(shards=2, password_profile="testing"))
    rt = app.state.tenfold
    await rt.db.open()
    await rt.db.migrate()
    await rt.db.close()
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        reply = await client.post(
            "/auth/register", json={"username": "traced", "password": "correct horse"}
        )
        assert reply.status_code == 201

        def consumed() -> bool:
            return any(s.name == "consume arena.points" for s in spans.get_finished_spans())

        await wait_until(consumed, timeout_s=10)
    finished = spans.get_finished_spans()
    server = next(s for s in finished if s.name == "POST /auth/register")
    trace_id = server.context.trace_id
    queries = [s for s in finished if s.name == "db.query" and s.context.trace_id == trace_id]
    assert any("INSERT INTO arena_users" in str(s.attributes["db.statement"]) for s in queries)
    consumer = next(s for s in finished if s.name == "consume arena.points")
    assert consumer.context.trace_id == trace_id  # carried in the event's headers
    assert server.attributes["http.route"] == "/auth/register"
    assert server.attributes["http.response.status_code"] == 201
    # the relay's background polls are not traced as root spans
    assert all(s.parent is not None for s in finished if s.name == "db.query")


async def test_tracing_off_records_nothing(make_settings: Any) -> None:
    assert not tracing.enabled()
    with tracing.span("x") as span:
        assert span is None
    assert tracing.inject({}) == {}
    assert tracing.extract({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None
