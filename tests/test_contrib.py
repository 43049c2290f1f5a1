"""contrib/: the Prometheus alert rules pass ``promtool check rules`` and their own unit tests
(``promtool test rules``), and the rules and the Grafana dashboard name only metrics keeper
exposes. promtool is Debian's ``prometheus`` package (.ci/run installs it); without it the
promtool tests are skipped with the reason, and fail when CI is set."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from keeper.config import build_config
from keeper.metrics import process
from keeper.observe.collector import DatabaseCollector
from keeper.observe.exposition import registry_for
from keeper.store.grants import Store
from tests.conftest import ROOT, TEST_CIPHER, unavailable

RULES = ROOT / "contrib" / "prometheus" / "keeper-rules.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "keeper.json"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool missing: apt-get install prometheus"
        unavailable(message)
    return found


@pytest.mark.e2e
def test_promtool_accepts_the_rules() -> None:
    ran = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS: 8 rules found" in ran.stdout


@pytest.mark.e2e
def test_the_alerts_fire_in_promtools_unit_tests() -> None:
    ran = subprocess.run([promtool(), "test", "rules", "keeper-rules.test.yml"],
                         capture_output=True, text=True, check=False, cwd=RULES.parent)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def exposed(tmp_path: Path) -> set[str]:
    """Every sample name a scrape of keeper holds, with one of each process metric made."""
    config = build_config({"apps": [{"appid": "wx1"}]}, env={}, source=str(tmp_path / "k"))
    store = Store(f"sqlite:///{tmp_path / 'k.db'}", cipher=TEST_CIPHER, auto_upgrade=True).open()
    was = process.enabled()
    process.enable()
    try:
        process.wechat_call("wx1", "refresh", None, 0.1)
        process.sweep_finished({"seconds": 1.0, "refresh_tokens_refreshed": 1})
        process.sweep_failed()
        process.quota_taken("wx1", "refresh", 1)
        process.quota_waited("wx1", "refresh", 0.5)
        process.quota_exhausted("wx1", "refresh")
        process.leases_lost(1)
        process.api_request("GET", "/healthz", 200, 0.01)
        now = datetime.now(UTC)
        store.finish_sweep(store.start_sweep(now, host="h", pid=1), now, {})
        text = generate_latest(registry_for(DatabaseCollector(
            store=lambda: store, config=lambda: config))).decode()
    finally:
        process.enable(was)
        store.close()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_rules_and_the_dashboard_name_only_metrics_keeper_exposes(tmp_path: Path) -> None:
    names = exposed(tmp_path)
    assert {"keeper_grants", "keeper_reauth_records", "keeper_wechat_calls_total",
            "keeper_sweep_duration_seconds_count",
            "keeper_last_sweep_finished_timestamp_seconds"} <= names
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = set(re.findall(r"\bkeeper_[a-z_]+", "\n".join(exprs)))
    assert used and used <= names, used - names
