"""The Prometheus alerting rules in deploy/prometheus: valid, and unit-tested by promtool.

`promtool test rules` feeds the series in alerts_test.yml to alerts.yml and
checks which alerts fire, with which labels and annotations. promtool comes
with Prometheus (Debian: apt-get install prometheus); without it these tests
are skipped, and pytest's summary (-ra) says so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_rules_are_valid() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


@needs_promtool
def test_rules_fire_when_they_should_and_only_then() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    """An alert added to alerts.yml without a case in alerts_test.yml fails here."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == {
        "TenfoldHighErrorRate",
        "TenfoldHighLatencyP95",
        "TenfoldPoolSaturated",
        "TenfoldConsumerLag",
        "TenfoldDeadLettersGrowing",
    }
    assert alerts <= tested, f"alerts without a firing test case: {sorted(alerts - tested)}"
