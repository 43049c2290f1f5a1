"""``python -m bench``: a sweep against the simulator in its own process, measured.

Two runs: one where the quota does not bind (throughput: bounded by WeChat's latency and the
keeper), one where it binds (the simulator's busiest window must stay within the quota, and
the quota should be nearly used up). The unbound run is followed, in the same process and
against the same simulator, by the floor: the same grants refreshed by ``--floor-threads``
threads of ``requests.Session``, storing nothing. Keeper's figures are printed beside the
floor's, with the ratios and the targets. Prints the figures, as text and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import multiprocessing
import resource
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

from bench.env import Sim
from bench.seed import app_ids, grant_rows, store_grants
from keeper.config import build_config
from keeper.core.quota import parse_quota
from keeper.crypto import create_key_file
from keeper.log import configure
from keeper.service.runtime import Runtime, cipher_for
from keeper.store.grants import Store

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.bench")

# Keeper against the floor in the same run: at least as many refreshes/s, at most half the
# CPU per refresh (the floor's are the least a Python client with requests costs).
TARGETS = {"refreshes_ratio_min": 1.0, "cpu_ratio_max": 0.5}
#: ``--apps N``: N apps, each with its own quota, cost at most this much CPU per refresh
#: more than one app with its quota, on one process.
APPS_CPU_RATIO_MAX = 1.10
#: The quota each app has in the ``--apps`` runs: its own rows and pool, never binding.
APP_QUOTA = "1000000/minute"
#: In the ``--apps`` runs, the due grants' access tokens expired over this many seconds, in
#: an order unrelated to the rows' (a table filled by real logins): a sweep then claims
#: grants scattered over the table in both runs. Left in storage order, one app's claims
#: would take neighbouring rows and N apps' (stored in turn) every Nth, and the database's
#: page locality, not keeper's cost per app, would decide the ratio (1.14-1.21x measured so,
#: 1.00-1.02x with each app's rows side by side).
APPS_SPREAD_S = 60.0


def floor_run(sim_url: str, rows: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """The floor: ``threads`` threads, each with a ``requests.Session`` of its own, calling the
    simulator's refresh endpoint once for each of ``rows`` and parsing the answer; nothing is
    stored. CPU is this process's, as for keeper's sweep (both run in the bench process)."""
    url = f"{sim_url}/sns/oauth2/refresh_token"
    # Handed out by a shared counter rather than in fixed slices: a thread slowed by the
    # shared machine does not leave a tail of its own grants for the end.
    take = itertools.count()
    done = [0] * threads
    failed = [0] * threads

    def worker(t: int) -> None:
        with requests.Session() as http:
            while (i := next(take)) < len(rows):  # itertools.count is atomic under the GIL
                r = rows[i]
                try:
                    answer = http.get(url, params={
                        "appid": r["appid"], "grant_type": "refresh_token",
                        "refresh_token": r["refresh_token"]}, timeout=(5, 30)).json()
                except (requests.RequestException, ValueError):
                    failed[t] += 1
                    continue
                if "access_token" in answer:
                    done[t] += 1
                else:
                    failed[t] += 1

    pool = [threading.Thread(target=worker, args=(t,), name=f"floor-{t}", daemon=True)
            for t in range(threads)]
    cpu0 = time.process_time()
    t0 = time.monotonic()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    seconds = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    refreshes = sum(done)
    return {
        "threads": threads, "seconds": round(seconds, 2), "refreshes": refreshes,
        "failed": sum(failed),
        "refreshes_per_s": round(refreshes / seconds, 1) if seconds else None,
        "cpu_s_per_1000_refreshes": round(cpu / refreshes * 1000, 3) if refreshes else None,
    }


def compare(keeper: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """Keeper's figures over the floor's, and whether they meet the targets."""
    rps = (keeper["refreshes_per_s"] / floor["refreshes_per_s"]
           if keeper["refreshes_per_s"] and floor["refreshes_per_s"] else None)
    cpu = (keeper["cpu_s_per_1000_refreshes"] / floor["cpu_s_per_1000_refreshes"]
           if keeper["cpu_s_per_1000_refreshes"] and floor["cpu_s_per_1000_refreshes"]
           else None)
    return {
        "refreshes_ratio": round(rps, 2) if rps is not None else None,
        "cpu_ratio": round(cpu, 2) if cpu is not None else None,
        "targets": TARGETS,
        "meets_targets": rps is not None and cpu is not None
        and rps >= TARGETS["refreshes_ratio_min"] and cpu <= TARGETS["cpu_ratio_max"],
    }


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


def _store_idle(url: str, config: Any, not_due: int, now: float, at: datetime) -> None:
    """``not_due`` grants whose access tokens are good for two hours (in a child process)."""
    store = Store(url, cipher=cipher_for(config)).open()
    clock = config.lifetime(config.apps[0])
    for start in range(0, not_due, 50000):
        idle = [dict(r, openid=f"idle-{start + i:08d}") for i, r in
                enumerate(grant_rows(min(50000, not_due - start), now))]
        store_grants(store, idle, clock, access_expires_at=at + timedelta(hours=2))
    store.close()


def run_once(*, grants: int, latency_ms: float, workers: int, quota: str | None,
             database_url: str | None, not_due: int = 0,
             around: Callable[[Runtime], AbstractContextManager[Any]] | None = None,
             floor_threads: int = 0, apps: int = 1,
             app_quota: str | None = None, spread_s: float = 0.0) -> dict[str, Any]:
    """Seed ``grants`` access-expired grants (and ``not_due`` fresh ones beside them), sweep
    once, return the figures. ``around``: what runs beside the sweep (``python -m bench
    metrics``: a scraped metrics listener). ``floor_threads``: then the floor
    (:func:`floor_run`) over the same grants and simulator, under ``"floor"``. ``apps``: the
    grants are spread over that many apps; ``app_quota``: each app's refresh quota when
    ``quota`` is not given (none by default). ``spread_s``: the due grants' access tokens
    expired over that many seconds, in an order unrelated to the rows' (see
    :func:`bench.seed.store_grants`)."""
    appids = app_ids(apps)
    sim = Sim(latency_ms, quota, appids)
    tmp = tempfile.TemporaryDirectory(prefix="keeper-bench-")
    try:
        url = database_url or f"sqlite:///{tmp.name}/bench.db"
        key_file = Path(tmp.name) / "bench.key"
        create_key_file(key_file)
        data: dict[str, Any] = {
            "database_url": url, "api_base": sim.url, "workers": workers,
            "encryption_key_file": str(key_file),
            "log_level": "warning", "apps": [{"appid": a} for a in appids],
        }
        data["quotas"] = {"refresh": quota or app_quota or "none"}
        config = build_config(data, env={}, source="bench")
        now = time.time()
        rows = grant_rows(grants, now, appids)
        sim.seed(rows)
        store = Store(url, cipher=cipher_for(config), auto_upgrade=True).open()
        clock = config.lifetime(config.apps[0])
        at = datetime.now(UTC)
        store_grants(store, rows, clock, access_expires_at=at - timedelta(seconds=60),
                     spread_s=spread_s)
        store.close()
        if not_due:
            # A big table, mostly not due, written by a child process: the memory its million
            # rows took while they were made is not this process's, whose RSS is the sweep's.
            child = multiprocessing.get_context("fork").Process(
                target=_store_idle, args=(url, config, not_due, now, at))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"seeding {not_due} grants failed ({child.exitcode})")
        floor_rows = rows if floor_threads else []  # else let the sweep run without them
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
        stats = sim.stats()  # keeper's calls only: the floor's come after
        # The simulator does not rotate refresh tokens, so the same grants refresh again.
        floor = floor_run(sim.url, floor_rows, floor_threads) if floor_threads else None
    finally:
        sim.close()
        tmp.cleanup()
    refreshes = summary["access_tokens_refreshed"] + summary["refresh_tokens_refreshed"]
    ep = stats["endpoints"]["refresh"]
    result = {
        "apps": apps,
        "app_quota": None if quota else app_quota,
        "due_spread_s": spread_s,
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
    if floor is not None:
        result["floor"] = floor
        result.update(compare(result, floor))
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--grants", type=int, default=20000, help="grants due (unbound run)")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--floor-threads", type=int, default=None,
                   help="threads of the floor run after the unbound one (default: --workers; "
                   "0: no floor)")
    p.add_argument("--quota", default="2000/5 seconds", help="refresh quota of the bound run")
    p.add_argument("--bound-grants", type=int, default=8000, help="grants due (bound run)")
    p.add_argument("--not-due", type=int, default=0,
                   help="extra grants stored beside the due ones (unbound run), none due")
    p.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    p.add_argument("--apps", type=int, default=1,
                   help="N > 1: after the runs above, the unbound grants once more with one app "
                   f"and then spread over N apps, each app with its own quota ({APP_QUOTA}, "
                   "never binding), and the CPU per refresh of both (target: N apps <= "
                   f"{APPS_CPU_RATIO_MAX}x one app's)")
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
        floor_threads = args.workers if args.floor_threads is None else args.floor_threads
        r = run_once(grants=grants, latency_ms=args.latency_ms, workers=args.workers,
                     quota=quota, database_url=args.database_url,
                     not_due=args.not_due if quota is None else 0,
                     floor_threads=floor_threads if quota is None else 0)
        runs[name] = r
        print(f"  {r['refreshes']} refreshes in {r['seconds']} s = {r['refreshes_per_s']}/s; "
              f"calls {r['calls']}; busiest window {r['max_window']}"
              + (f" (quota {quota}; {r['quota_used_pct']} % of the quota rate used; "
                 f"{r['quota_rejected']} answered 45011)" if quota else "")
              + f"; CPU {r['cpu_s_per_1000_refreshes']} s per 1000 refreshes; RSS "
              f"{r['rss_before_sweep_mib']} MiB before the sweep, at most "
              f"{r['peak_rss_during_sweep_mib']} MiB during it "
              f"(process peak {r['peak_rss_mib']} MiB)", flush=True)
        if "floor" in r:
            f, t = r["floor"], TARGETS
            print(f"  floor ({f['threads']} threads of requests.Session, same grants and "
                  f"simulator, nothing stored): {f['refreshes']} refreshes in {f['seconds']} s "
                  f"= {f['refreshes_per_s']}/s ({f['failed']} failed); CPU "
                  f"{f['cpu_s_per_1000_refreshes']} s per 1000 refreshes\n"
                  f"  keeper / floor: refreshes/s {r['refreshes_per_s']} vs "
                  f"{f['refreshes_per_s']} = {r['refreshes_ratio']}x (target >= "
                  f"{t['refreshes_ratio_min']}x); CPU per 1000 refreshes "
                  f"{r['cpu_s_per_1000_refreshes']} vs {f['cpu_s_per_1000_refreshes']} s = "
                  f"{r['cpu_ratio']}x (target <= {t['cpu_ratio_max']}x)", flush=True)
    if args.apps > 1 and args.grants > 0:
        for name, apps in (("one_app", 1), ("many_apps", args.apps)):
            print(f"{name}: {args.grants} grants due over {apps} app(s), each with its own quota "
                  f"({APP_QUOTA}), their access tokens expired over {APPS_SPREAD_S:g} s in an "
                  f"order unrelated to the rows', {args.latency_ms:g} ms latency, "
                  f"{args.workers} workers ...", flush=True)
            r = runs[name] = run_once(grants=args.grants, latency_ms=args.latency_ms,
                                      workers=args.workers, quota=None,
                                      database_url=args.database_url, apps=apps,
                                      app_quota=APP_QUOTA, spread_s=APPS_SPREAD_S)
            print(f"  {r['refreshes']} refreshes in {r['seconds']} s = {r['refreshes_per_s']}/s; "
                  f"CPU {r['cpu_s_per_1000_refreshes']} s per 1000 refreshes", flush=True)
        one, many = runs["one_app"], runs["many_apps"]
        ratio = (many["cpu_s_per_1000_refreshes"] / one["cpu_s_per_1000_refreshes"]
                 if many["cpu_s_per_1000_refreshes"] and one["cpu_s_per_1000_refreshes"]
                 else None)
        many["cpu_ratio_to_one_app"] = round(ratio, 2) if ratio is not None else None
        many["apps_cpu_ratio_max"] = APPS_CPU_RATIO_MAX
        print(f"  {args.apps} apps / one app: CPU per 1000 refreshes "
              f"{many['cpu_s_per_1000_refreshes']} vs {one['cpu_s_per_1000_refreshes']} s = "
              f"{many['cpu_ratio_to_one_app']}x (target <= {APPS_CPU_RATIO_MAX}x)", flush=True)
    print(json.dumps(runs))
    ok = all(r["quota_rejected"] == 0 for r in runs.values())
    if "bound" in runs:
        ok = ok and runs["bound"]["max_window"] <= parse_quota(args.quota).count
    return 0 if ok else 1

