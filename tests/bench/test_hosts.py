"""``python -m bench hosts`` keeps working: a tiny run through test hosts (network namespaces;
skipped with a visible reason where they cannot be made, required when CI is set) and one with
the hosts as processes on loopback. Numbers are not checked, only that they are there and that
the bench's own checks (each grant refreshed once, no quota window over the quota) held."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest
from sqlalchemy import create_engine, text

from bench.hosts_run import rates
from bench.netns import IP
from tests.conftest import PG_SERVER, ROOT, require_postgres, unavailable

# Among the test hosts (one after another under xdist): it lists the namespaces and processes
# left behind, which another namespace test running beside it would make.
pytestmark = [pytest.mark.hosts]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    server = PG_SERVER.rsplit("/", 1)[0] + "/postgres"
    return subprocess.run(
        [sys.executable, "-m", "bench", "hosts", "--hosts", "2", "--workers", "4",
         "--grants-per-host", "60", "--latency-ms", "20", "--database-server", server, *args],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=240, check=False)


def _bench_databases() -> list[str]:
    engine = create_engine(PG_SERVER)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT datname FROM pg_database WHERE datname LIKE 'keeper_bench_%'")).scalars())
    finally:
        engine.dispose()


def _namespaces() -> set[str]:
    if not os.path.exists(IP):
        return set()
    listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("where", ["namespaces", "loopback"])
def test_a_tiny_run_measures_every_run_and_leaves_nothing_behind(where: str) -> None:
    require_postgres()
    if where == "namespaces" and os.geteuid() != 0:
        message = "test hosts (network namespaces) need root"
        unavailable(message)
    before, namespaces = set(_bench_databases()), _namespaces()
    ran = _bench(*(["--loopback"] if where == "loopback" else []))
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert ("namespaces" in result["where"]) == (where == "namespaces")
    runs = result["runs"]
    assert [(runs[k]["hosts"], runs[k]["grants"]) for k in ("one", "all", "bound")] == [
        (1, 60), (2, 120), (2, 120)]
    for r in runs.values():
        assert r["calls"] == r["ok"] == r["grants"] and r["refreshed_other_than_once"] == 0
        assert r["refreshes_per_s"] > 0 and len(r["host_cpu_s"]) == r["hosts"]
    bound = runs["bound"]
    assert bound["max_sliding_window"] <= bound["quota_count"] and bound["quota_used_pct"] > 0
    assert result["ratio"] > 0
    # Its hosts, namespaces and database are gone.
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if any("keeper-bench-hosts-" in a for a in p.info["cmdline"] or ())]
    assert leftovers == []
    assert _namespaces() <= namespaces
    assert set(_bench_databases()) <= before


def test_rates_leave_out_the_first_and_last_tenth() -> None:
    """100 calls, 10 a second, except a slow start and a straggler at the end: the steady
    rate is 10/s, the whole run's lower."""
    arrivals = [0.0, 5.0] + [5.0 + i / 10 for i in range(1, 97)] + [20.0, 30.0]
    steady, whole, span = rates(arrivals)
    assert steady == pytest.approx(10.0)
    assert span == 30.0 and whole == pytest.approx(99 / 30)
    assert rates([1.0, 2.0]) == (0.0, 0.0, 0.0)
