"""The Grafana dashboard in deploy/ charts only metrics `/metrics` really exports, and charts each of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.gateway.metric_families import _Families

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "magi-dashboard.json"
METRIC = re.compile(r"\bmagi_[a-zA-Z0-9_]+")
SELECTOR = re.compile(r"(magi_[a-zA-Z0-9_]+)\{([^}]*)\}")


def _series(family) -> dict[str, list[str]]:
    """A family's series names as a scrape holds them (histograms' _bucket/_sum/_count, counters' _total)
    -> their labels."""
    labels = list(family._labelnames)
    if family.type == "counter":
        return {family.name + "_total": labels}
    if family.type == "histogram":
        return {family.name + "_bucket": [*labels, "le"], family.name + "_sum": labels, family.name + "_count": labels}
    return {family.name: labels}


def _exported() -> dict[str, list[str]]:
    return {name: labels for family in _Families().all for name, labels in _series(family).items()}


def _panels() -> list[dict]:
    board = json.loads(DASHBOARD.read_text())
    return [p for p in board["panels"] if p["type"] != "row"]


def test_the_dashboard_imports_with_a_prometheus_datasource_input():
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["expr"].strip()


def test_every_query_names_exported_metrics_and_labels_and_every_family_is_charted():
    exported = _exported()
    used: set[str] = set()
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(METRIC.findall(expr))
            assert names, f"{panel['title']}: {expr} reads no MAGI metric"
            unknown = names - set(exported)
            assert not unknown, f"{panel['title']}: {sorted(unknown)} are not exported (metric_families.py)"
            for name, matchers in SELECTOR.findall(expr):
                for matcher in filter(None, (m.strip() for m in matchers.split(","))):
                    label = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
                    assert label in exported[name], f"{panel['title']}: {name} has no label {label!r}"
            for group in re.findall(r"by \(([^)]*)\)", expr):
                labels = {g.strip() for g in group.split(",")}
                assert any(labels <= set(exported[n]) for n in names), f"{panel['title']}: by ({group})"
            used |= names
    uncharted = [f.name for f in _Families().all if not set(_series(f)) & used]
    assert uncharted == [], "families without a panel"
