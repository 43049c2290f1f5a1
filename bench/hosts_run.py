"""One run of ``python -m bench hosts`` (:class:`Bench`): the hosts' configs and database, the
grants made due once every host is idle, and the figures counted at the simulator. ``python -m
bench quotas`` runs its cells through it too, on loopback and on SQLite as well."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import create_engine, func, make_url, select

from bench.env import Child
from bench.net import BridgeSim, ChildProcess, Place
from bench.seed import APPID, grant_rows, store_grants
from keeper.config import load_config
from keeper.core.quota import parse_quota
from keeper.crypto import create_key_file
from keeper.service.runtime import cipher_for
from keeper.store.grants import Store
from keeper.store.schema import grants, sweeps

#: The share of calls left out at each end when measuring the steady rate.
TRIM = 0.10


@dataclass
class Run:
    """One run's figures."""

    name: str
    hosts: int
    grants: int
    quota: str | None
    figures: dict[str, Any]


class Bench:
    """The database, the simulator, the hosts' configs; :meth:`run` measures one run.

    ``args`` holds ``hosts`` (configs written), ``workers``, ``latency_ms`` and
    ``grants_per_host``; ``grants`` (default ``hosts * grants_per_host``) are made and seeded
    once, and each run makes the first of them due. Without a ``forwarder`` the hosts reach
    the database at ``db_url`` itself (loopback, or a SQLite file they share)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, db_url: str, where: Place,
                 sim: BridgeSim, forwarder: ChildProcess | None, *,
                 grants: int | None = None) -> None:
        self.args, self.workdir, self.where, self.sim = args, workdir, where, sim
        self.host_url = (make_url(db_url) if forwarder is None else
                         make_url(db_url).set(host=where.address, port=forwarder.value))
        #: The bench's other processes, whose CPU is reported beside the hosts'.
        self.helpers = {"simulator": sim.child,
                        **({"forwarder": forwarder} if forwarder is not None else {})}
        self.host_url_text = self.host_url.render_as_string(hide_password=False)
        create_key_file(workdir / "bench.key")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.write_configs(None)
        config = load_config(str(workdir / "host-1" / "keeper.toml"), env=self.env)
        self.store = Store(db_url, cipher=cipher_for(config), auto_upgrade=True).open()
        self.clock = config.lifetime(config.apps[0])
        self.rows = grant_rows(grants or args.hosts * args.grants_per_host, time.time())
        sim.seed(self.rows)
        store_grants(self.store, self.rows, self.clock,
                     access_expires_at=datetime.now(UTC) + timedelta(hours=2))
        self.db = create_engine(db_url)

    def write_configs(self, quota: str | None) -> None:
        for i in range(1, self.args.hosts + 1):
            d = self.workdir / f"host-{i}"
            d.mkdir(exist_ok=True)
            (d / "keeper.toml").write_text(
                f'database_url = "{self.host_url_text}"\napi_base = "{self.sim.url}"\n'
                f'encryption_key_file = "{self.workdir / "bench.key"}"\n'
                f"workers = {self.args.workers}\nsweep_interval = 1\n"
                f'lease = "2m"\nlog_level = "info"\nmetrics_listen = ""\n'
                f'[quotas]\nrefresh = "{quota or "none"}"\n[[apps]]\nappid = "{APPID}"\n')

    def close(self) -> None:
        self.store.close()
        self.db.dispose()

    # -- the database, as the bench sees it (directly)

    def _finished_sweeps(self, pids: Sequence[int]) -> dict[int, int]:
        """Per process, the id of its newest finished sweep (0: none yet)."""
        with self.db.connect() as conn:
            rows = conn.execute(select(sweeps.c.pid, func.max(sweeps.c.id))
                                .where(sweeps.c.pid.in_(list(pids)), sweeps.c.summary.is_not(None))
                                .group_by(sweeps.c.pid)).all()
        found = {int(pid): int(newest) for pid, newest in rows}
        return {p: found.get(p, 0) for p in pids}

    def _refreshed_by_host(self, pids: Sequence[int], since: dict[int, int]) -> list[int]:
        """Per process, the access tokens refreshed by its sweeps finished after the sweep
        ``since`` names: which processes took part (one that claimed nothing refreshed none)."""
        with self.db.connect() as conn:
            rows = conn.execute(select(sweeps.c.pid, sweeps.c.id, sweeps.c.summary).where(
                sweeps.c.pid.in_(list(pids)), sweeps.c.summary.is_not(None))).all()
        done = dict.fromkeys(pids, 0)
        for pid, sweep_id, summary in rows:
            if sweep_id > since[pid]:
                done[pid] += int(json.loads(summary).get("access_tokens_refreshed", 0))
        return [done[p] for p in pids]

    def _due(self) -> int:
        # The bench's clock, not the database's: SQLite's CURRENT_TIMESTAMP has no fraction
        # and keeper stores SQLite times as naive strings (same machine, same clock).
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(grants).where(
                grants.c.access_expires_at <= datetime.now(UTC))).scalar_one())

    def _wait(self, what: str, predicate: Callable[[], bool], timeout_s: float,
              procs: Sequence[Child]) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            dead = [p.proc.pid for p in procs if p.proc.poll() is not None]
            if dead:
                raise SystemExit(f"a host's keeper ended while waiting for {what} (pid {dead})"
                                 + self._log_tails())
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}" + self._log_tails())
            time.sleep(0.2)  # polling another process's progress, not waiting for time

    def _log_tails(self) -> str:
        """The last lines each host logged (its directory goes with the bench's)."""
        tails = []
        for err in sorted(self.workdir.glob("host-*/keeper.err")):
            lines = err.read_text(errors="replace").splitlines()[-5:]
            tails.append(f"\n{err.parent.name}:\n  " + "\n  ".join(lines))
        return "".join(tails)

    # -- one run

    def run(self, name: str, hosts: int, quota: str | None, *, grants: int | None = None,
            calls: int | None = None, timeout_s: float | None = None) -> Run:
        """``grants`` due (default ``grants_per_host`` per host), all refreshed within
        ``timeout_s`` (default: five times what the hosts' workers would take unbound).

        With ``calls``, the run ends once the simulator has counted that many refresh calls:
        the hosts are stopped with grants still due, so the backlog lasts the whole run and
        every host is still working when it ends (a run that works every grant ends with a
        tail in which hosts that ran out of grants sit idle). The grants are then made not
        due again, for the next run."""
        n = grants or hosts * self.args.grants_per_host
        if timeout_s is None:
            timeout_s = max(120.0, 5 * n / (hosts * self.args.workers / self._latency_s))
        self.write_configs(quota)
        self.sim.post("config", {"quotas": {"refresh": quota or "100000000/minute"}})
        dirs = [self.workdir / f"host-{i + 1}" for i in range(hosts)]
        procs = [Child(self.where.argv(i, [sys.executable, "-m", "keeper", "--config",
                                           str(d / "keeper.toml"), "run"]),
                       d / "keeper.err", cwd=d, env=self.env) for i, d in enumerate(dirs)]
        pids = [p.proc.pid for p in procs]
        try:
            # Every host has started and swept once (nothing due): all are idle and ready.
            self._wait("the hosts to start", lambda: all(self._finished_sweeps(pids).values()),
                       60, procs)
            self.sim.post("reset-stats", {})
            cpu0 = [p.cpu_s() for p in procs]
            helpers0 = {k: c.cpu_s() for k, c in self.helpers.items()}
            machine0 = psutil.cpu_times()
            begun = self._finished_sweeps(pids)
            started = time.monotonic()
            store_grants(self.store, self.rows[:n], self.clock,
                         access_expires_at=datetime.now(UTC) - timedelta(seconds=60))
            if calls is None:
                self._wait("every grant to be refreshed", lambda: self._due() == 0, timeout_s,
                           procs)
                mark = self._finished_sweeps(pids)
                # Every host has finished a sweep since: nothing is still in its hands.
                self._wait("the hosts to settle", lambda: all(
                    v > mark[p] for p, v in self._finished_sweeps(pids).items()), 60, procs)
            else:
                self._wait(f"{calls} refresh calls", lambda: self._calls() >= calls, timeout_s,
                           procs)
            elapsed = time.monotonic() - started
            cpu = [p.cpu_s() - c for p, c in zip(procs, cpu0, strict=True)]
            helpers = {k: c.cpu_s() - helpers0[k] for k, c in self.helpers.items()}
            machine = psutil.cpu_times()
        finally:
            # SIGTERM to all at once, as systemd would (none working on while another stops);
            # SIGKILL after 30 s.
            for p in procs:
                p.terminate()
            for p in procs:
                p.reap(timeout_s=30)
        codes = [p.proc.returncode for p in procs]
        if any(codes):
            raise SystemExit(f"a host's keeper exited with {codes}" + self._log_tails())
        figures = self._figures(n, hosts, quota, elapsed, cpu, machine0, machine, helpers,
                                every_grant=calls is None)
        # Read once the hosts are gone: a sweep the stop ended wrote its summary on the way.
        figures["refreshed_by_host"] = self._refreshed_by_host(pids, begun)
        if calls is not None:
            store_grants(self.store, self.rows[:n], self.clock,
                         access_expires_at=datetime.now(UTC) + timedelta(hours=2))
        return Run(name, hosts, n, quota, figures)

    def _calls(self) -> int:
        return int(self.sim.stats()["endpoints"]["refresh"]["calls"])

    @property
    def _latency_s(self) -> float:
        return float(self.args.latency_ms) / 1000.0

    def _figures(self, n: int, hosts: int, quota: str | None, elapsed: float,
                 cpu: list[float], machine0: Any, machine: Any,
                 helpers: dict[str, float], *, every_grant: bool = True) -> dict[str, Any]:
        stats = self.sim.detail()
        ep = stats["endpoints"]["refresh"]
        arrivals: list[float] = stats["arrivals"]["refresh"]
        by_openid: dict[str, int] = stats["refreshes_by_openid"]
        steady, whole, span = rates(arrivals)
        busy = _busy_share(machine0, machine)
        bound = self.args.workers / self._latency_s
        f: dict[str, Any] = {
            "calls": ep["calls"], "ok": ep["ok"], "quota_rejected": ep["quota_rejected"],
            "refreshes_per_s": round(steady, 1), "whole_run_per_s": round(whole, 1),
            "seconds_of_calls": round(span, 2), "seconds_in_all": round(elapsed, 2),
            "latency_bound_per_host": round(bound, 1),
            "per_host_share_of_latency_bound_pct": round(100 * steady / hosts / bound, 1),
            "host_cpu_s": [round(c, 2) for c in cpu],
            "host_cpu_share_of_a_core_pct": [round(100 * c / span, 1) if span else None
                                             for c in cpu],
            "host_cpu_ms_per_refresh": round(1000 * sum(cpu) / max(1, ep["ok"]), 2),
            "machine_cpu_busy_pct": round(100 * busy, 1),
            **{f"{k}_cpu_share_of_a_core_pct": round(100 * c / span, 1) if span else None
               for k, c in helpers.items()},
            "max_sliding_window": ep["max_sliding_window"],
            "max_fixed_window": ep["max_fixed_window"],
        }
        counts = [by_openid.get(r["openid"], 0) for r in self.rows[:n]]
        if every_grant:
            f["refreshed_other_than_once"] = sum(1 for c in counts if c != 1)
        else:  # the run ended with grants due: those were refreshed not at all, the rest once
            f["refreshed_more_than_once"] = sum(1 for c in counts if c > 1)
            f["left_due"] = counts.count(0)
        if quota:
            q = parse_quota(quota)
            f["quota"], f["quota_count"] = quota, q.count
            f["quota_rate_per_s"] = round(q.count / q.period_s, 1)
            f["quota_used_pct"] = round(100 * steady / (q.count / q.period_s), 1)
            # How close the run came to a window over the quota: the shortest span of count + 1
            # calls in a row (below the period, a window held one call too many), and where.
            spans = [(b - a, i) for i, (a, b) in enumerate(
                zip(arrivals, arrivals[q.count:], strict=False))]
            if spans:
                span, at = min(spans)
                f["closest_span_s"], f["closest_span_from_call"] = round(span, 4), at
        return f


def rates(arrivals: Sequence[float]) -> tuple[float, float, float]:
    """(steady calls/s between the TRIM and 1 - TRIM quantiles of arrival, whole-run calls/s,
    seconds from first call to last) of sorted arrival times."""
    n = len(arrivals)
    if n < 10:
        return 0.0, 0.0, 0.0
    low, high = int(n * TRIM), int(n * (1 - TRIM))
    span = arrivals[-1] - arrivals[0]
    steady = (high - low) / (arrivals[high] - arrivals[low])
    return steady, (n - 1) / span, span


def _busy_share(before: Any, after: Any) -> float:
    """The machine's CPU busy share (all cores) between two psutil.cpu_times()."""
    total = sum(after) - sum(before)
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    return 1 - idle / total if total > 0 else 0.0
