"""``python -m bench`` keeps working: a tiny unbound sweep (a few hundred grants, WeChat at
5 ms) and its floor, run in the same invocation. Numbers are not checked, only that keeper's
and the floor's figures and the ratios between them are there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_a_tiny_sweep_prints_the_floor_beside_keeper() -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "bench", "--grants", "300", "--bound-grants", "0",
         "--latency-ms", "5", "--workers", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert ran.returncode == 0, ran.stderr[-2000:]
    unbound = json.loads(ran.stdout.strip().splitlines()[-1])["unbound"]
    assert unbound["refreshes"] == 300 and unbound["calls"]["refresh"] == 300
    floor = unbound["floor"]
    # The floor's threads default to keeper's workers; every grant refreshed once by it too.
    assert floor["threads"] == 8
    assert floor["refreshes"] == 300 and floor["failed"] == 0
    assert floor["refreshes_per_s"] > 0 and floor["cpu_s_per_1000_refreshes"] > 0
    assert unbound["refreshes_ratio"] > 0 and unbound["cpu_ratio"] > 0
    assert unbound["targets"] == {"refreshes_ratio_min": 1.0, "cpu_ratio_max": 0.5}
    assert isinstance(unbound["meets_targets"], bool)
    assert "keeper / floor: refreshes/s" in ran.stdout


def test_many_apps_each_with_its_quota_are_measured_beside_one() -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "bench", "--grants", "300", "--bound-grants", "0",
         "--latency-ms", "5", "--workers", "8", "--floor-threads", "0", "--apps", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert ran.returncode == 0, ran.stderr[-2000:]
    runs = json.loads(ran.stdout.strip().splitlines()[-1])
    one, many = runs["one_app"], runs["many_apps"]
    assert (one["apps"], many["apps"]) == (1, 3)
    assert one["refreshes"] == many["refreshes"] == 300 and many["quota_rejected"] == 0
    assert many["app_quota"] == "1000000/minute" and many["cpu_ratio_to_one_app"] > 0
    assert "3 apps / one app: CPU per 1000 refreshes" in ran.stdout
