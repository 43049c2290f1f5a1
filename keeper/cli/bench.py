"""``keeper bench``: a sweep against the simulator in its own process, measured.

Two runs: one where the quota does not bind (throughput: bounded by WeChat's latency and the
keeper), one where it binds (the simulator's busiest window must stay within the quota, and
the quota should be nearly used up). Prints the figures, as text and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import requests
import structlog

from keeper.config import build_config
from keeper.core.models import Grant
from keeper.core.policy import schedule
from keeper.core.quota import parse_quota
from keeper.crypto import create_key_file
from keeper.log import configure
from keeper.service.runtime import Runtime, cipher_for
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite

APPID = "wxbench0000000001"
SECRET = "bench-secret-not-used"  # noqa: S105 - a simulator app's made-up secret
# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.bench")


class Sim:
    """The simulator as a child process, driven through its admin API."""

    def __init__(self, latency_ms: float, quota: str | None) -> None:
        argv = [sys.executable, "-m", "keeper.wechat.simulator", "--latency-ms", str(latency_ms),
                "--app", f"{APPID}={SECRET}"]
        if quota:
            argv += ["--quota", f"refresh={quota}"]
        else:
            argv += ["--quota", "refresh=100000000/minute"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = json.loads(self.proc.stdout.readline())["url"]
        self.http = requests.Session()

    def seed(self, grants: list[dict[str, Any]]) -> None:
        for i in range(0, len(grants), 20000):
            r = self.http.post(f"{self.url}/_sim/grants", json={"grants": grants[i:i + 20000]},
                               timeout=120)
            r.raise_for_status()

    def stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.url}/_sim/stats", timeout=30).json()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class _RssSampler:
    """The process's resident memory before and at its highest during a block (every 50 ms)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.before = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> _RssSampler:
        self.before = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _grants(n: int, now: float) -> list[dict[str, Any]]:
    return [
        {"appid": APPID, "openid": f"bench-{i:07d}", "access_token": f"bench-at-{i}",
         "refresh_token": f"bench-rt-{i}", "access_expires_at": now - 60,
         "refresh_issued_at": now - 3 * 86400, "scope": "snsapi_base"}
        for i in range(n)
    ]


def _store_grants(store: Store, rows: list[dict[str, Any]], clock: Any, *,
                  access_expires_at: datetime) -> None:
    at = datetime.now(UTC)
    for i in range(0, len(rows), 5000):
        writes = []
        for r in rows[i:i + 5000]:
            g = Grant(0, APPID, r["openid"], None, r["scope"], r["access_token"],
                      r["refresh_token"], access_expires_at, at - timedelta(days=3))
            writes.append(GrantWrite(g, schedule(g, clock)))
        store.upsert_grants(writes, at)


def run_once(*, grants: int, latency_ms: float, workers: int, quota: str | None,
             database_url: str | None, not_due: int = 0,
             around: Callable[[Runtime], AbstractContextManager[Any]] | None = None,
             ) -> dict[str, Any]:
    """Seed ``grants`` access-expired grants (and ``not_due`` fresh ones beside them), sweep
    once, return the figures. ``around``: what runs beside the sweep (``keeper bench
    metrics``: a scraped metrics listener)."""
    sim = Sim(latency_ms, quota)
    tmp = tempfile.TemporaryDirectory(prefix="keeper-bench-")
    try:
        url = database_url or f"sqlite:///{tmp.name}/bench.db"
        key_file = Path(tmp.name) / "bench.key"
        create_key_file(key_file)
        data: dict[str, Any] = {
            "database_url": url, "api_base": sim.url, "workers": workers,
            "encryption_key_file": str(key_file),
            "log_level": "warning", "apps": [{"appid": APPID}],
        }
        if quota:
            data["quotas"] = {"refresh": quota}
        else:
            data["quotas"] = {"refresh": "none"}
        config = build_config(data, env={}, source="bench")
        now = time.time()
        rows = _grants(grants, now)
        sim.seed(rows)
        store = Store(url, cipher=cipher_for(config), auto_upgrade=True).open()
        clock = config.lifetime(config.apps[0])
        at = datetime.now(UTC)
        _store_grants(store, rows, clock, access_expires_at=at - timedelta(seconds=60))
        for start in range(0, not_due, 50000):  # a big table, mostly not due
            idle = [dict(r, openid=f"idle-{start + i:08d}") for i, r in
                    enumerate(_grants(min(50000, not_due - start), now))]
            _store_grants(store, idle, clock, access_expires_at=at + timedelta(hours=2))
        store.close()
        del rows
        gc.collect()
        rt = Runtime.build(config)
        sweeper = rt.sweeper()
        sampler = _RssSampler()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        with sampler, (around(rt) if around else contextlib.nullcontext()):
            summary = sweeper.run_once()
        seconds = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        sweeper.close()
        rt.close()
        stats = sim.stats()
    finally:
        sim.close()
        tmp.cleanup()
    refreshes = summary["access_tokens_refreshed"] + summary["refresh_tokens_refreshed"]
    ep = stats["endpoints"]["refresh"]
    result = {
        "grants_due": grants,
        "grants_stored": grants + not_due,
        "seconds": round(seconds, 2),
        "refreshes": refreshes,
        "refreshes_per_s": round(refreshes / seconds, 1) if seconds else None,
        "calls": {k: v["calls"] for k, v in stats["endpoints"].items()},
        "quota": quota,
        "max_window": ep["max_sliding_window"],
        "max_fixed_window": ep["max_fixed_window"],
        "quota_rejected": ep["quota_rejected"],
        "transient_failures": summary["transient_failures"],
        "cpu_s_per_1000_refreshes": round(cpu / refreshes * 1000, 3) if refreshes else None,
        "rss_before_sweep_mib": round(sampler.before / 2**20, 1),
        "peak_rss_during_sweep_mib": round(sampler.peak / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if quota:
        q = parse_quota(quota)
        result["quota_rate_per_s"] = round(q.count / q.period_s, 1)
        result["quota_used_pct"] = round(100 * refreshes / seconds / (q.count / q.period_s), 1)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["api"]:  # keeper bench api: the HTTP API (keeper/cli/bench_api.py)
        from keeper.cli.bench_api import main as bench_api

        return bench_api(argv[1:])
    if argv[:1] == ["metrics"]:  # keeper bench metrics: the cost of metrics
        from keeper.cli.bench_metrics import main as bench_metrics

        return bench_metrics(argv[1:])
    if argv[:1] == ["hosts"]:  # keeper bench hosts: throughput with hosts, a shared quota
        from keeper.cli.bench_hosts import main as bench_hosts

        return bench_hosts(argv[1:])
    if argv[:1] == ["events"]:  # keeper bench events: delivery to webhooks
        from keeper.cli.bench_events import main as bench_events

        return bench_events(argv[1:])
    p = argparse.ArgumentParser(prog="keeper bench", description=__doc__)
    p.add_argument("--grants", type=int, default=20000, help="grants due (unbound run)")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--quota", default="2000/5 seconds", help="refresh quota of the bound run")
    p.add_argument("--bound-grants", type=int, default=8000, help="grants due (bound run)")
    p.add_argument("--not-due", type=int, default=0,
                   help="extra grants stored beside the due ones (unbound run), none due")
    p.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = p.parse_args(argv)
    configure("warning")
    threading.current_thread().name = "bench"
    runs = {}
    for name, grants, quota in (("unbound", args.grants, None),
                                ("bound", args.bound_grants, args.quota)):
        if grants <= 0:
            continue
        idle = f" (+{args.not_due} not due)" if args.not_due and quota is None else ""
        print(f"{name}: {grants} grants due{idle}, {args.latency_ms:g} ms latency, "
              f"{args.workers} workers, quota {quota or 'none'} ...", flush=True)
        r = run_once(grants=grants, latency_ms=args.latency_ms, workers=args.workers,
                     quota=quota, database_url=args.database_url,
                     not_due=args.not_due if quota is None else 0)
        runs[name] = r
        print(f"  {r['refreshes']} refreshes in {r['seconds']} s = {r['refreshes_per_s']}/s; "
              f"calls {r['calls']}; busiest window {r['max_window']}"
              + (f" (quota {quota}; {r['quota_used_pct']} % of the quota rate used; "
                 f"{r['quota_rejected']} answered 45011)" if quota else "")
              + f"; CPU {r['cpu_s_per_1000_refreshes']} s per 1000 refreshes; RSS "
              f"{r['rss_before_sweep_mib']} MiB before the sweep, at most "
              f"{r['peak_rss_during_sweep_mib']} MiB during it "
              f"(process peak {r['peak_rss_mib']} MiB)", flush=True)
    print(json.dumps(runs))
    ok = all(r["quota_rejected"] == 0 for r in runs.values())
    if "bound" in runs:
        ok = ok and runs["bound"]["max_window"] <= parse_quota(args.quota).count
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
