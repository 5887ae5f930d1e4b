"""The chat page at `/`, in two real headless Chromium pages against a real `tenfold up`.

Debian's `chromium` (/usr/bin/chromium), driven by Playwright through
`executable_path` (no `playwright install`). `tenfold up` runs in embedded mode
in tmp_path with cheap password hashing. User A registers, logs in and creates
a room; user B registers, logs in and joins it by id; what A types appears in
B's page, live over the WebSocket hub, and B's presence list shows A.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.support import free_port

CHROMIUM = os.environ.get("TENFOLD_TEST_CHROMIUM", "/usr/bin/chromium")

if importlib.util.find_spec("playwright") is None or not Path(CHROMIUM).exists():
    pytest.skip(
        f"browser test needs Playwright and Chromium at {CHROMIUM} "
        "(pip install -e '.[dev]'; apt-get install chromium)",
        allow_module_level=True,
    )

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

CLI = [sys.executable, "-m", "tenfold.cli.main"]
PASSWORD = "correct horse battery staple"
LIVE_S = 5.0  # how long a live message may take to show up in the other page


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    env.update(
        PYTHONUNBUFFERED="1", TENFOLD_PASSWORD_PROFILE="testing", TENFOLD_LOG_LEVEL="WARNING"
    )
    return env


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tenfold up` (embedded mode) on a free port; its base URL once /readyz answers 200."""
    cwd = tmp_path_factory.mktemp("arena")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = cwd / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*CLI, "up", "--port", str(port)], cwd=cwd, env=_env(), stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"tenfold up exited {proc.returncode}:\n{log_path.read_text()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"not ready within 30 s:\n{log_path.read_text()}")
                time.sleep(0.1)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        # --no-sandbox: the suite runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def pages(browser: Browser, arena: str) -> Iterator[tuple[Page, Page]]:
    """Two pages in separate contexts (separate sessionStorage): two people."""
    contexts = [browser.new_context(base_url=arena) for _ in range(2)]
    errors: list[str] = []
    out = []
    for ctx in contexts:
        ctx.set_default_timeout(10_000)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        out.append(page)
    try:
        yield out[0], out[1]
        assert not errors, f"uncaught errors in the page: {errors}"
    finally:
        for ctx in contexts:
            ctx.close()


def _sign_in(page: Page) -> str:
    """Open `/`, register a fresh user through the form, log in; the user name."""
    name = f"u{uuid.uuid4().hex[:10]}"
    page.goto("/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.get_by_test_id("username").fill(name)
    page.get_by_test_id("password").fill(PASSWORD)
    page.get_by_test_id("register").click()
    expect(page.get_by_test_id("auth-status")).to_have_attribute("data-state", "registered")
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("app")).to_be_visible()
    expect(page.get_by_test_id("me")).to_have_text(name)
    expect(page.get_by_test_id("error")).to_be_hidden()
    return name


def _create_room(page: Page, name: str) -> str:
    page.get_by_test_id("room-name").fill(name)
    page.get_by_test_id("create-room").click()
    expect(page.get_by_test_id("chat")).to_be_visible()
    expect(page.get_by_test_id("room-title")).to_have_text(name)
    room_id = page.get_by_test_id("room-id").text_content() or ""
    assert room_id.isdigit(), room_id
    return room_id


def _join_room(page: Page, room_id: str, name: str) -> None:
    page.get_by_test_id("join-room-id").fill(room_id)
    page.get_by_test_id("join-room").click()
    expect(page.get_by_test_id("room-id")).to_have_text(room_id)
    expect(page.get_by_test_id("room-title")).to_have_text(name)
    expect(page.get_by_test_id("error")).to_be_hidden()


def _send(page: Page, body: str) -> None:
    page.get_by_test_id("message-input").fill(body)
    page.get_by_test_id("send").click()


def _message(page: Page, body: str) -> Any:
    return page.get_by_test_id("messages").locator("li.message", has_text=body)


def test_the_page_and_its_files_are_served(arena: str) -> None:
    page = httpx.get(f"{arena}/", timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        reply = httpx.get(f"{arena}{path}", timeout=5)
        assert reply.status_code == 200, path
        assert kind in reply.headers["content-type"], reply.headers
    # The page is not part of the API schema.
    assert "/" not in httpx.get(f"{arena}/openapi.json", timeout=5).json()["paths"]


def test_two_people_chat_over_http(pages: tuple[Page, Page]) -> None:
    """Register, log in, create, join by id, send, history: the HTTP half, no hub needed."""
    a, b = pages
    _sign_in(a)
    room_name = f"room {uuid.uuid4().hex[:6]}"
    room_id = _create_room(a, room_name)
    _sign_in(b)
    _join_room(b, room_id, room_name)

    # User text is text, never markup.
    body = f"<b>hi</b> <img src=x onerror=alert(1)> {uuid.uuid4().hex[:8]}"
    _send(a, body)
    expect(_message(a, body)).to_have_count(1)
    b.get_by_test_id("reload-history").click()
    mine = _message(b, body)
    expect(mine).to_have_count(1)
    expect(mine.locator(".body")).to_have_text(body)
    assert b.get_by_test_id("messages").locator("b, img").count() == 0

    # "My rooms" lists the room for both (a projection fed by events: eventually).
    for page in (a, b):
        item = page.locator(f'[data-testid="rooms-list"] li[data-room-id="{room_id}"]')
        deadline = time.monotonic() + 5
        while item.count() == 0 and time.monotonic() < deadline:
            page.get_by_test_id("refresh-rooms").click()
            page.wait_for_timeout(200)
        expect(item).to_have_count(1)


def test_a_message_typed_in_one_page_appears_live_in_the_other(pages: tuple[Page, Page]) -> None:
    a, b = pages
    name_a = _sign_in(a)
    room_name = f"live {uuid.uuid4().hex[:6]}"
    room_id = _create_room(a, room_name)
    # Both pages subscribe to room:<id> over /ws once their auth frame is accepted.
    expect(a.get_by_test_id("ws-status")).to_have_attribute("data-state", "subscribed")
    name_b = _sign_in(b)
    _join_room(b, room_id, room_name)
    expect(b.get_by_test_id("ws-status")).to_have_attribute("data-state", "subscribed")

    # B's presence shows A (who was there first) and B; A sees B join.
    expect(b.locator(f'[data-testid="presence-member"][data-name="{name_a}"]')).to_have_count(1)
    expect(a.locator(f'[data-testid="presence-member"][data-name="{name_b}"]')).to_have_count(1)

    # Typing is an ephemeral publish: B sees that A is typing.
    a.get_by_test_id("message-input").press_sequentially("hel", delay=20)
    expect(b.get_by_test_id("typing")).to_contain_text(name_a, timeout=LIVE_S * 1000)

    body = f"hello from A {uuid.uuid4().hex[:8]}"
    a.get_by_test_id("message-input").fill(body)
    a.get_by_test_id("send").click()
    expect(_message(a, body)).to_have_count(1)
    # B loaded its history before A sent: the message can only arrive over the WebSocket.
    seen = _message(b, body)
    expect(seen).to_have_count(1, timeout=LIVE_S * 1000)
    expect(seen).to_have_attribute("data-source", "live")
    expect(seen.locator(".author")).to_have_text(name_a)
    # Shown once in each page (the live copy and the sender's own copy are deduplicated).
    a.wait_for_timeout(500)
    expect(_message(a, body)).to_have_count(1)
    expect(_message(b, body)).to_have_count(1)


def test_a_dropped_connection_recovers_what_it_missed(pages: tuple[Page, Page]) -> None:
    """B drops its WebSocket; A sends twice; B reconnects with `since` and gets both, in order."""
    a, b = pages
    _sign_in(a)
    room_name = f"drop {uuid.uuid4().hex[:6]}"
    room_id = _create_room(a, room_name)
    _sign_in(b)
    _join_room(b, room_id, room_name)
    expect(b.get_by_test_id("ws-status")).to_have_attribute("data-state", "subscribed")

    b.evaluate("window.arenaChat.pause()")
    expect(b.get_by_test_id("ws-status")).to_have_attribute("data-state", "closed")
    bodies = [f"while you were out {i} {uuid.uuid4().hex[:6]}" for i in range(2)]
    for body in bodies:
        _send(a, body)
        expect(_message(a, body)).to_have_count(1)
    b.evaluate("window.arenaChat.resume()")

    expect(b.get_by_test_id("ws-status")).to_have_attribute("data-state", "subscribed")
    expect(b.get_by_test_id("chat")).to_have_attribute("data-recovered", "true")
    for body in bodies:
        missed = _message(b, body)
        expect(missed).to_have_count(1, timeout=LIVE_S * 1000)
        expect(missed).to_have_attribute("data-source", "live")
    shown = b.get_by_test_id("messages").locator("li.message .body").all_text_contents()
    assert shown[-2:] == bodies, shown
