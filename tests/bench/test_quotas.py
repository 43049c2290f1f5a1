"""``python -m bench quotas`` keeps working: one tiny cell (10/2 s, one process, SQLite, three
windows of calls). The share is the bench's to report, not this test's to judge on a shared
machine: only a loose floor, and the bench's own checks (no window over the quota, no 45011,
no grant refreshed twice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from bench.quotas import cell_calls, cell_grants, promise_pct, schedule_pct
from keeper.core.quota import Quota
from tests.conftest import ROOT


@pytest.mark.e2e
@pytest.mark.slow
def test_a_tiny_grid_prints_its_table_and_keeps_the_quota() -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "bench", "quotas", "--quotas", "10/2 seconds", "--processes", "1",
         "--databases", "sqlite", "--windows", "3", "--workers", "4", "--latency-ms", "20"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=100, check=False)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    lines = ran.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("database"))
    assert "busiest/count" in lines[header] and "share" in lines[header]
    assert lines[header + 1].split()[:3] == ["sqlite", "10/2", "seconds"]
    result = json.loads(lines[-1])
    assert result["wrong"] == []
    [cell] = result["cells"]
    assert (cell["database"], cell["quota"], cell["processes"]) == ("sqlite", "10/2 seconds", 1)
    assert cell["calls"] == cell["ok"] >= 30 and cell["refreshed_by_host"] == [cell["ok"]]
    assert cell["busiest_window"] <= 10 and cell["quota_rejected"] == 0
    assert cell["refreshed_more_than_once"] == 0 and cell["left_due"] > 0
    assert 50 < cell["share_pct"] <= cell["promise_pct"] + 1
    # Its processes are gone (this checkout's: other checkouts on the machine run benches too).
    leftovers = [cmd for p in psutil.process_iter(["cmdline"]) if (cmd := p.info["cmdline"])
                 and cmd[0] == sys.executable and any("keeper-bench-quotas-" in a for a in cmd)]
    assert leftovers == []


def test_the_grid_arithmetic() -> None:
    """The promise's share is P / (P + slack) with no burst (the slack: P / 60, at least
    100 ms, or 7.5 % of a shorter period); the schedule in place reaches it; a cell's backlog
    outlasts it by two windows and a page per process."""
    assert promise_pct(Quota(12, 60)) == pytest.approx(100 * 60 / 61)
    assert promise_pct(Quota(10, 2)) == pytest.approx(100 * 2 / 2.1)
    assert schedule_pct(Quota(10, 2), 1) == pytest.approx(100 * 2 / 2.1, abs=0.2)
    assert schedule_pct(Quota(2, 1), 3) == pytest.approx(100 * 1 / 1.075, abs=0.2)
    assert cell_calls(Quota(2, 1), 6) == 16  # never fewer than a rate can be measured on
    assert cell_grants(Quota(480, 2), 3, 6, 32) == 6 * 480 + 2 * 480 + 3 * 32
