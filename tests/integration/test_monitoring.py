"""docs/monitoring: the Grafana dashboard and the Prometheus alert rules only use metrics
that GET /metrics really exposes, with labels and label values it really has, and the
rules file has the structure Prometheus loads (checked by ``promtool`` too when it is on
the PATH or named by ``$PROMTOOL``).

The scrape is made on the real test database after creating a session, recording one
run of every scheduled sweep and one worker-host heartbeat, since the sweep and host
families only have samples once such rows exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import create
from tests.support.factories import Caller

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "docs" / "monitoring"
ALERTS = MONITORING / "prometheus-alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"\blifecycle_[A-Za-z0-9_]+\b")
_SELECTOR = re.compile(r"\b(lifecycle_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_DURATION = re.compile(r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$")


# --------------------------------------------------------------------------- the files


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def every_expr() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard query and alert expression."""
    return [(f"dashboard: {e}", e) for e in dashboard_exprs()] + [
        (f"alert {r['alert']}", r["expr"]) for r in alert_rules()
    ]


def metric_names(expr: str) -> set[str]:
    """The ``lifecycle_*`` identifiers of a PromQL expression (string literals such as
    label values left out)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def selectors(expr: str) -> Iterator[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every label matcher on a lifecycle_* metric."""
    for metric, body in _SELECTOR.findall(expr):
        for label, op, value in _MATCHER.findall(body):
            yield metric, label, op, value


def github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


# --------------------------------------------------------------------------- the scrape


@pytest.fixture
def exposed(client: TestClient, caller: Caller) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets it has, from one scrape of /metrics."""
    from worker.celery_app import beat_schedule
    from worker.config import get_settings
    from worker.db.engine import get_sessionmaker
    from worker.routing import host_queue
    from worker.services import hosts, sweep_stats

    create(client, caller)
    assert client.app.state.background_publisher.flush(timeout=30)  # type: ignore[attr-defined]
    factory = get_sessionmaker()
    now = datetime.now(UTC)
    for name in beat_schedule(get_settings()):
        sweep_stats.record(
            factory,
            name,
            started_at=now - timedelta(seconds=1),
            finished_at=now,
            result={"items": 0},
        )
    with factory.begin() as db:
        hosts.beat(db, "docs-host", host_queue("docs-host"))

    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def test_every_metric_in_the_dashboard_and_alerts_is_exposed(
    exposed: dict[str, list[dict[str, str]]],
) -> None:
    missing = {
        f"{name} ({where})"
        for where, expr in every_expr()
        for name in metric_names(expr)
        if name not in exposed
    }
    assert not missing, (
        "not in a scrape of /metrics (counters are exposed as <name>_total, histograms as "
        "<name>_bucket/_sum/_count, summaries as <name>_sum/_count):\n"
        + "\n".join(sorted(missing))
        + f"\nexposed: {sorted(exposed)}"
    )
    # Both files use something: an empty or unparsed file would pass the check above.
    assert sum(bool(metric_names(e)) for _, e in every_expr()) >= 30


def test_label_matchers_name_real_labels_and_values(
    exposed: dict[str, list[dict[str, str]]],
) -> None:
    problems = []
    for where, expr in every_expr():
        for metric, label, op, value in selectors(expr):
            label_sets = exposed.get(metric, [])
            seen = {labels[label] for labels in label_sets if label in labels}
            if not seen:
                problems.append(f"{where}: {metric} has no label {label!r}")
            elif op == "=" and value not in seen:
                problems.append(f"{where}: {metric}{{{label}={value!r}}} matches nothing: {seen}")
            elif op == "=~" and not any(re.fullmatch(value, v) for v in seen):
                problems.append(f"{where}: {metric}{{{label}=~{value!r}}} matches nothing: {seen}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- structure


def test_alert_rules_have_the_structure_prometheus_loads() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    groups = document["groups"]
    assert isinstance(groups, list) and groups
    assert len({g["name"] for g in groups}) == len(groups), "group names must be unique"
    names = []
    for group in groups:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group.keys()
        assert isinstance(group["rules"], list) and group["rules"], group["name"]
        for rule in group["rules"]:
            where = f"{group['name']}/{rule.get('alert')}"
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, where
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), where
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), where
            assert _DURATION.match(str(rule["for"])), f"{where}: for {rule['for']!r}"
            assert rule["labels"]["severity"] in {"warning", "critical"}, where
            assert all(isinstance(v, str) for v in rule["labels"].values()), where
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), where
            assert all(isinstance(v, str) and v for v in rule["annotations"].values()), where
            names.append(rule["alert"])
    assert len(set(names)) == len(names), "alert names must be unique"
    # The rules the operations runbook promises.
    for alert in (
        "LifecycleApiDown",
        "LifecycleDatabaseDown",
        "LifecycleBrokerDown",
        "LifecycleOutboxBacklogGrowing",
        "LifecycleOutboxOldestHigh",
        "LifecycleLeasesExpired",
        "LifecycleSweepStale",
        "LifecycleSweepErrors",
        "LifecycleWorkerHostLost",
        "LifecycleRunFailureRatioHigh",
        "LifecycleRunDurationP99High",
    ):
        assert alert in names, alert


def test_runbook_links_point_at_headings_of_the_operations_guide() -> None:
    headings = {
        github_anchor(line.lstrip("#"))
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        link = rule["annotations"]["runbook"]
        path, _, anchor = link.partition("#")
        assert path == "docs/operations.md", link
        assert anchor in headings, f"{rule['alert']}: no heading for #{anchor} in {OPERATIONS}"


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("sessions", "runs", "duration", "outbox", "lease", "queue", "sweep", "host"):
        assert topic in titles, topic


def _promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool")


@pytest.mark.skipif(_promtool() is None, reason="promtool not installed (structure checked above)")
def test_promtool_accepts_the_rules_and_the_dashboard_queries(tmp_path: Path) -> None:
    promtool = _promtool()
    assert promtool is not None
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # promtool parses PromQL only inside rules: wrap each dashboard query in a recording
    # rule, with Grafana's $__rate_interval made a concrete range.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(dashboard_exprs())
    ]
    wrapped = tmp_path / "dashboard-queries.yml"
    wrapped.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(wrapped)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
