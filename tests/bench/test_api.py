"""``python -m bench api`` keeps working: a tiny run (about a second per phase) on SQLite, and the
one line it prints when wrk is missing. Numbers are not checked, only that they are there (the
floor's among them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT


def bench_api(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(env or os.environ), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench", "api", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk is not installed (Debian: apt-get install wrk)")
def test_a_tiny_run_measures_every_phase_and_leaves_nothing_running() -> None:
    ran = bench_api("--db", "sqlite", "--processes", "1", "--seconds", "1", "--users", "300",
                    "--sweep-grants", "50", "--concurrency", "4", "--stale-concurrency", "4",
                    "--lookups", "1", "--json")
    assert ran.returncode == 0, ran.stderr[-2000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    [run] = result["api"]
    assert run["processes"] == 1
    fresh, stale = run["fresh"], run["stale"]
    assert fresh["requests"] > 0 and fresh["errors"] == 0 and fresh["refresh_calls"] == 0
    assert fresh["p99_ms"] >= fresh["p50_ms"] > 0
    # Every stale request refreshed its user's token with one call to WeChat.
    assert stale["requests"] > 0 and stale["errors"] == 0
    assert stale["single_refresh_each"], stale
    assert stale["users_refreshed"] >= stale["requests"]
    assert [s["concurrency"] for s in result["subprocess"]] == [1, 4]
    assert all(s["errors"] == 0 for s in result["subprocess"])
    assert set(run["fresh_vs_subprocess"]) == {"c1", "c4"}
    # The same-stack floor ran in the same run, as keeper's fresh phase did, and the ratios
    # against it are there (their values are the benchmark's, not the test's).
    floor = run["floor"]
    assert floor["processes"] == 1
    assert floor["fresh"]["requests"] > 0 and floor["fresh"]["errors"] == 0
    assert floor["fresh"]["concurrency"] == fresh["concurrency"] == 4
    assert floor["fresh"]["p99_ms"] > 0 and "sweep_refreshes_per_s" in floor["fresh"]
    vs = run["vs_floor"]
    assert vs["fresh_rps_ratio"] > 0 and vs["fresh_p99_ratio"] > 0
    assert set(vs["meets"]) == {"fresh_rps", "fresh_p99", "stale_rps"}
    assert set(result["targets"]) == {"fresh_rps_ratio_min", "fresh_p99_ratio_max", "stale_rps"}
    # Its servers and sweeper ran with a config in the run's temporary directory.
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if any("keeper-bench-api-" in a for a in p.info["cmdline"] or ())]
    assert leftovers == []


def test_without_wrk_it_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    ran = bench_api("--seconds", "1", env={**os.environ, "PATH": str(tmp_path / "bin")})
    assert ran.returncode == 2
    assert ran.stdout == ""
    assert ran.stderr.strip().splitlines() == [
        "python -m bench api: wrk is not installed (Debian: apt-get install wrk); nothing measured"
    ]
