"""The `redis` and `nats` markers: registered, and put on the tests that need those servers."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import pytest_collection_modifyitems

ROOT = Path(__file__).resolve().parents[2]


class Item:
    """What the collection hook reads of a test item."""

    def __init__(self, fixtures: tuple[str, ...] = (), **params: Any) -> None:
        self.fixturenames = list(fixtures)
        self.callspec = SimpleNamespace(params=params) if params else None
        self.markers: list[str] = []

    def add_marker(self, marker: Any) -> None:
        self.markers.append(marker.name)


def test_markers_are_registered_for_strict_markers() -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in options["addopts"]
    declared = {line.split(":", 1)[0] for line in options["markers"]}
    assert {"postgres", "redis", "nats"} <= declared


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (Item(("redis_url", "tmp_path")), ["redis"]),
        (Item(("nats_url",)), ["nats"]),
        (Item(("nats_server",)), ["nats"]),
        (Item(("make_storage",), make_storage="redis"), ["redis"]),  # getfixturevalue inside
        (Item(("streams",), streams="nats"), ["nats"]),
        (Item(("make_storage",), make_storage="memory"), []),
        (Item(("tmp_path",)), []),
        (Item(("redis_url", "nats_url")), ["redis", "nats"]),
    ],
)
def test_tests_needing_a_server_get_its_marker(item: Item, expected: list[str]) -> None:
    pytest_collection_modifyitems(None, [item])  # type: ignore[arg-type, list-item]
    assert item.markers == expected
