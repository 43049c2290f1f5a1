"""One run of ``python -m bench hosts`` (:class:`Bench`): the hosts' configs and database, the
grants made due once every host is idle, and the figures counted at the simulator."""

from __future__ import annotations

import argparse
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
    """The database, the simulator, the hosts' configs; :meth:`run` measures one run."""

    def __init__(self, args: argparse.Namespace, workdir: Path, db_url: str, where: Place,
                 sim: BridgeSim, forwarder: ChildProcess) -> None:
        self.args, self.workdir, self.where, self.sim = args, workdir, where, sim
        self.host_url = make_url(db_url).set(host=where.address, port=forwarder.value)
        #: The bench's other processes, whose CPU is reported beside the hosts'.
        self.helpers = {"simulator": sim.child, "forwarder": forwarder}
        self.host_url_text = self.host_url.render_as_string(hide_password=False)
        create_key_file(workdir / "bench.key")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.write_configs(None)
        config = load_config(str(workdir / "host-1" / "keeper.toml"), env=self.env)
        self.store = Store(db_url, cipher=cipher_for(config), auto_upgrade=True).open()
        self.clock = config.lifetime(config.apps[0])
        self.rows = grant_rows(args.hosts * args.grants_per_host, time.time())
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

    def _due(self) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(grants).where(
                grants.c.access_expires_at <= func.now())).scalar_one())

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

    def run(self, name: str, hosts: int, quota: str | None) -> Run:
        n = hosts * self.args.grants_per_host
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
            started = time.monotonic()
            store_grants(self.store, self.rows[:n], self.clock,
                         access_expires_at=datetime.now(UTC) - timedelta(seconds=60))
            self._wait("every grant to be refreshed", lambda: self._due() == 0,
                       max(120.0, 5 * n / (hosts * self.args.workers / self._latency_s)), procs)
            mark = self._finished_sweeps(pids)
            # Every host has finished a sweep since: nothing is still in its hands.
            self._wait("the hosts to settle", lambda: all(
                v > mark[p] for p, v in self._finished_sweeps(pids).items()), 60, procs)
            elapsed = time.monotonic() - started
            cpu = [p.cpu_s() - c for p, c in zip(procs, cpu0, strict=True)]
            helpers = {k: c.cpu_s() - helpers0[k] for k, c in self.helpers.items()}
            machine = psutil.cpu_times()
        finally:
            for p in procs:  # SIGTERM, as systemd would; SIGKILL after 30 s
                p.stop(timeout_s=30)
        codes = [p.proc.returncode for p in procs]
        if any(codes):
            raise SystemExit(f"a host's keeper exited with {codes}" + self._log_tails())
        return Run(name, hosts, n, quota,
                   self._figures(n, hosts, quota, elapsed, cpu, machine0, machine, helpers))

    @property
    def _latency_s(self) -> float:
        return float(self.args.latency_ms) / 1000.0

    def _figures(self, n: int, hosts: int, quota: str | None, elapsed: float,
                 cpu: list[float], machine0: Any, machine: Any,
                 helpers: dict[str, float]) -> dict[str, Any]:
        stats = self.sim.detail()
        ep = stats["endpoints"]["refresh"]
        arrivals: list[float] = stats["arrivals"]["refresh"]
        by_openid: dict[str, int] = stats["refreshes_by_openid"]
        steady, whole, span = rates(arrivals)
        busy = _busy_share(machine0, machine)
        bound = self.args.workers / self._latency_s
        f: dict[str, Any] = {
            "calls": ep["calls"], "ok": ep["ok"], "quota_rejected": ep["quota_rejected"],
            "refreshed_other_than_once": sum(1 for r in self.rows[:n]
                                             if by_openid.get(r["openid"]) != 1),
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
        if quota:
            q = parse_quota(quota)
            f["quota"], f["quota_count"] = quota, q.count
            f["quota_rate_per_s"] = round(q.count / q.period_s, 1)
            f["quota_used_pct"] = round(100 * steady / (q.count / q.period_s), 1)
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
