"""The operations files: ``ops/prometheus/alerts.yml`` (with its promtool unit tests) and the
Grafana dashboard ``ops/grafana/adacode.json`` name only metrics the worker exports.

promtool comes from ``ops/test.sh``, which installs it when missing; without it these tests
fail, never skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from quantize.code_metrics import CodeReport
from worker.core.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "adacode.json"

# series Prometheus adds itself, beside those the worker exports
PROMETHEUS_SERIES = {"up"}

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left"}
_KEYWORDS |= {"group_right", "offset", "bool", "inf", "nan"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not on PATH: ops/test.sh installs it (apt-get install -y prometheus); "
            "run the tests through ops/test.sh or install it yourself"
        )
    return subprocess.run(
        [promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def exported_series() -> set[str]:
    """Every series name of a worker's /metrics, each metric set once (a metric whose labels
    were never set has no series, so each is given one) and the state memory watched."""
    m = Metrics()
    m.watch_state_memory(lambda: {"memtables": 1, "block_cache": 2, "table_readers": 3})
    m.observe_batch(
        applied={("interaction", "d"): 1},
        dead_topics=["t"],
        texts_encoded=1,
        code_changes=[("d", "new")],
        seconds=0.01,
    )
    m.count_consumed("t", 1)
    m.set_lag("t", 0, 5)
    m.observe_codes(
        "d", CodeReport(10, 2, 2, 4, 0.1, 0.0, (0.5, 0.5), (1.0, 1.0), 1.0, 2.0, 8, 6, 4)
    )
    for gauge in (m.version, m.version_created, m.finetune_seconds, m.finetune_recall):
        gauge.labels("d").set(1)
    m.rejected_versions.labels("d").set(0)
    m.dead_letters_refused.labels("t").inc()
    m.up.set(1)
    names = set()
    for line in m.render().decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label
    matchers, ranges, grouping clauses, function calls and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, templates)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\S+", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, str]]:
    """``(panel title, expression)`` of every target of every panel (rows' panels included)."""
    doc = json.loads(DASHBOARD.read_text())
    found = []
    stack = list(doc["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def test_metric_names_reads_a_promql_expression() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(adacode_batch_seconds_bucket{job="a"}'
        "[$__rate_interval]))) > 1e3 and on(instance) up offset 5m unless x_total[10m:1m]"
    )
    assert metric_names(expr) == {"adacode_batch_seconds_bucket", "up", "x_total"}


def test_exported_series_include_histogram_counter_and_process_series() -> None:
    names = exported_series()
    assert {"adacode_batch_seconds_bucket", "adacode_batch_seconds_count"} <= names
    assert {"adacode_rejected_events_total", "adacode_dead_letters_refused_total"} <= names
    assert {"adacode_up", "adacode_state_memory_bytes", "process_resident_memory_bytes"} <= names
    assert "adacode_rejected_events" not in names  # a counter's series end in _total


def test_alert_rules_are_valid() -> None:
    done = _promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    done = _promtool("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {str(rule["alert"]) for rule in alert_rules()} <= tested


def test_alerts_read_only_exported_metrics() -> None:
    known = exported_series() | PROMETHEUS_SERIES
    for rule in alert_rules():
        names = metric_names(str(rule["expr"]))
        assert names, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert names <= known, f"{rule['alert']}: not exported: {sorted(names - known)}"
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert {"summary", "description"} <= set(annotations), rule["alert"]
        assert rule.get("for") is not None, rule["alert"]
        labels = rule["labels"]
        assert isinstance(labels, dict)
        assert labels.get("severity") in {"critical", "warning"}, rule["alert"]


def test_dashboard_reads_only_exported_metrics() -> None:
    known = exported_series() | PROMETHEUS_SERIES
    targets = dashboard_targets()
    assert targets
    for title, expr in targets:
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric found in {expr!r}"
        assert names <= known, f"panel {title!r}: not exported: {sorted(names - known)}"


def test_dashboard_variables() -> None:
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    domain = variables["domain"]
    assert domain["definition"] == "label_values(adacode_current_version, domain)"
    assert "adacode_current_version" in exported_series()
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
