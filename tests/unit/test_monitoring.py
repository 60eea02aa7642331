"""deploy/monitoring: the Prometheus rules pass `promtool check rules` and their own unit tests
(`promtool test rules`), the Grafana dashboard is well-formed, and every metric either names is
one `/metrics` serves (`assert_monitoring_names_exist`, called by
tests/integration/test_metrics.py on a real scrape)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# metric names are ours, or the standard collectors' (process_*, python_*)
METRIC = re.compile(r"\b(?:crm_relay|process|python)_[a-z0-9_]+\b")
# figures read from the database, the same in every process: never summed over processes
CLUSTER_WIDE = {
    "crm_relay_jobs",
    "crm_relay_jobs_due",
    "crm_relay_oldest_due_job_age_seconds",
    "crm_relay_dead_letters",
    "crm_relay_forward_jobs",
    "crm_relay_forward_dead_jobs",
    "crm_relay_cluster_processes",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool missing: Debian's `prometheus` package (scripts/test installs it)")
    return found


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(exprs: Iterable[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def assert_monitoring_names_exist(samples: Iterable[tuple[str, Any]]) -> None:
    """Every metric the rules and the dashboard use is among the scraped sample names (a
    histogram by its `_bucket`/`_count`/`_sum`, a counter by its `_total`)."""
    served = {name for name, _labels in samples}
    used = metric_names([*rule_exprs(), *dashboard_exprs()])
    assert used - served == set(), "used by deploy/monitoring, not served by /metrics"


def test_promtool_checks_the_rules_and_runs_their_tests() -> None:
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(
        [tool, "test", "rules", "alerts.test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_the_dashboard_is_importable_grafana_json() -> None:
    d = dashboard()
    assert d["uid"] == "crm-relay" and d["title"]
    [variable] = d["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


def test_cluster_wide_figures_are_never_summed() -> None:
    """A cluster-wide figure is taken once (`max`), with its `scope="cluster"` label."""
    for expr in [*rule_exprs(), *dashboard_exprs()]:
        for name in metric_names([expr]) & CLUSTER_WIDE:
            assert re.search(rf"max(?: by \([^)]*\))? ?\({name}\{{scope=\"cluster\"", expr), expr


def test_the_names_are_checked_against_a_real_scrape() -> None:
    """The integration test holds the names against /metrics; here, that there are some, of
    each kind: ours, process_* and python_*."""
    used = metric_names([*rule_exprs(), *dashboard_exprs()])
    assert {"process_resident_memory_bytes", "python_gc_collections_total"} <= used
    assert len([n for n in used if n.startswith("crm_relay_")]) >= 15
