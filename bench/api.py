"""``python -m bench api``: token look-ups through ``keeper serve``, measured with ``wrk`` while a
``keeper run`` sweeps a population of due grants in the same database against the same
simulator; then the same look-ups made with ``keeper token`` as a subprocess, for the ratio.

Three populations of one app (scope snsapi_base, so no profile reads): ``fresh-N`` (access
tokens good for 2 h: look-ups only), ``stale-N`` (good for 1 h and asked for with ``min_valid``
at its maximum, so each user's first request refreshes; sweeps leave them alone) and
``bench-N`` (expired: the sweep's work, made due again before each phase).

For each process count, the same-stack floor is measured in the same run, with the same wrk
script, concurrency and users and the sweep beside: a bare Starlette app under uvicorn with as
many processes (:mod:`bench.floor_api`) reading the same database's row by appid and openid.
Keeper's fresh-token figures are printed beside the floor's, with the ratios. Prints numbers
beside the targets, not pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import func, select

from bench.env import Child, Sim, database
from bench.seed import APPID, store_grants
from keeper.api.keys import new_key
from keeper.config import ACCESS_TOKEN_LIFE_S, load_config
from keeper.crypto import create_key_file
from keeper.service.runtime import cipher_for
from keeper.store.grants import Store
from keeper.store.schema import grants

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MIN_VALID_MAX = ACCESS_TOKEN_LIFE_S - 600  # the token endpoint's bound on min_valid
# Fresh tokens against the floor in the same run (at least half its requests/s, at most 1.25
# times its p99); stale tokens, each a refresh with WeChat at 50 ms, in absolute terms.
TARGETS = {"fresh_rps_ratio_min": 0.5, "fresh_p99_ratio_max": 1.25, "stale_rps": 500}
LUA = Path(__file__).with_name("api.lua")
ROOT = Path(__file__).resolve().parent.parent  # the checkout, for the floor's import of bench


def _free_base() -> str:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{free.getsockname()[1]}"


def _rows(prefix: str, n: int, expires_in_s: float, now: float) -> list[dict[str, Any]]:
    return [{"appid": APPID, "openid": f"{prefix}{i:07d}", "access_token": f"at-{prefix}{i}",
             "refresh_token": f"rt-{prefix}{i}", "access_expires_at": now + expires_in_s,
             "refresh_issued_at": now - 3 * 86400, "scope": "snsapi_base"} for i in range(n)]


class Bench:
    """One run's database, simulator, keys and config; starts servers, measures phases."""

    def __init__(self, args: argparse.Namespace, workdir: Path, db_url: str, sim: Sim) -> None:
        self.args, self.workdir, self.sim, self.db_url = args, workdir, sim, db_url
        self.base = _free_base()
        self.floor_base = _free_base()
        self.key, line = new_key("bench", "tokens")
        (workdir / "api-keys").write_text(line + "\n")
        create_key_file(workdir / "bench.key")
        self.config_path = workdir / "keeper.toml"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
        self.write_config(1)
        config = load_config(str(self.config_path), env=self.env)
        self.store = Store(db_url, cipher=cipher_for(config), auto_upgrade=True).open()
        self.clock = config.lifetime(config.apps[0])
        now = time.time()
        self.pop = {"fresh": _rows("fresh-", args.users, 7200, now),
                    "stale": _rows("stale-", args.users, 3600, now),
                    "sweep": _rows("bench-", args.sweep_grants, -60, now)}
        sim.seed([r for rows in self.pop.values() for r in rows])
        self.arm("fresh", 7200)

    def write_config(self, processes: int) -> None:
        self.config_path.write_text(
            f'database_url = "{self.db_url}"\napi_base = "{self.sim.url}"\n'
            'encryption_key_file = "bench.key"\nsweep_interval = 1\nlog_level = "info"\n'
            f'[quotas]\nrefresh = "none"\n[[apps]]\nappid = "{APPID}"\n[api]\n'
            f'listen = "{self.base.removeprefix("http://")}"\nkeys_file = "api-keys"\n'
            f"processes = {processes}\n")

    def keeper(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "keeper", "--config", str(self.config_path), *argv]

    def arm(self, population: str, expires_in_s: float) -> None:
        at = datetime.now(UTC) + timedelta(seconds=expires_in_s)
        store_grants(self.store, self.pop[population], self.clock, access_expires_at=at)

    def child(self, name: str, *argv: str) -> Child:
        return Child(self.keeper(*argv), self.workdir / f"{name}.log", cwd=self.workdir,
                     env=self.env)

    def serve(self, processes: int) -> Child:
        self.write_config(processes)
        return self.started(self.child(f"serve-{processes}", "serve"), self.base, "keeper serve")

    def serve_floor(self, processes: int) -> Child:
        """The floor app under uvicorn with keeper's loop and HTTP parser, ``processes`` of it."""
        host, port = self.floor_base.removeprefix("http://").split(":")
        argv = [sys.executable, "-m", "uvicorn", "bench.floor_api:app", "--host", host,
                "--port", port, "--workers", str(processes), "--loop", "uvloop",
                "--http", "httptools", "--no-access-log", "--log-level", "warning",
                "--timeout-keep-alive", "5"]
        env = {**self.env, "FLOOR_DATABASE_URL": self.db_url, "PYTHONPATH": str(ROOT)}
        served = Child(argv, self.workdir / f"floor-{processes}.log", cwd=self.workdir, env=env)
        return self.started(served, self.floor_base, "the floor app")

    def started(self, served: Child, base: str, what: str) -> Child:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(base + "/healthz", timeout=1).status_code == 200:
                    return served
            if served.proc.poll() is not None or time.monotonic() > deadline:
                served.stop()
                raise SystemExit(f"{what} did not start; see {served.log.name}")
            time.sleep(0.1)

    def wrk(self, served: Child, prefix: str, seconds: float, concurrency: int, *,
            query: str = "", walk: bool = False, base: str | None = None) -> dict[str, Any]:
        threads = min(2, concurrency)
        argv = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
                "--timeout", "10s", "-s", str(LUA), base or self.base, "--", APPID, prefix,
                str(self.args.users), query, "walk" if walk else "random", str(threads)]
        cpu0 = served.cpu_s()
        ran = subprocess.run(argv, capture_output=True, text=True, check=False,
                             env={**os.environ, "BENCH_KEY": self.key})
        cpu = served.cpu_s() - cpu0
        line = next((x for x in ran.stdout.splitlines() if x.startswith("BENCH ")), None)
        if line is None:
            raise SystemExit(f"wrk failed: {(ran.stderr or ran.stdout).strip()[:500]}")
        w = json.loads(line[6:])
        s, n = w["duration_us"] / 1e6, max(1, w["requests"])
        return {"seconds": round(s, 2), "requests": w["requests"], "concurrency": concurrency,
                "requests_per_s": round(w["requests"] / s),
                **{f"{k}_ms": w[f"{k}_us"] / 1000 for k in ("p50", "p90", "p99", "max")},
                "errors": w["non2xx"] + w["socket_errors"] + w["timeouts"],
                "api_cpu_ms_per_request": round(cpu * 1000 / n, 3), "wrapped": bool(w["wrapped"])}

    def phase(self, measure: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, int]]:
        """Make the sweep's population due, measure; the result and refresh calls by openid."""
        self.arm("sweep", -60)
        self.sim.http.post(f"{self.sim.url}/_sim/reset-stats", timeout=30).raise_for_status()
        t0 = time.monotonic()
        result = measure()
        seconds = time.monotonic() - t0
        stats = self.sim.http.get(f"{self.sim.url}/_sim/stats?detail=1", timeout=60).json()
        calls: dict[str, int] = stats["refreshes_by_openid"]
        swept = sum(n for o, n in calls.items() if o.startswith("bench-"))
        result["sweep_refreshes_per_s"] = round(swept / seconds)
        return result, calls

    def api_run(self, processes: int) -> dict[str, Any]:
        a = self.args
        served = self.serve(processes)
        try:
            self.wrk(served, "fresh-", 1, a.concurrency)  # warm every process's pools
            fresh, calls = self.phase(lambda: self.wrk(served, "fresh-", a.seconds,
                                                       a.concurrency))
            fresh["refresh_calls"] = sum(n for o, n in calls.items() if o.startswith("fresh-"))
            self.arm("stale", 3600)

            def stale_run() -> dict[str, Any]:
                r = self.wrk(served, "stale-", a.seconds, a.stale_concurrency,
                             query=f"?min_valid={MIN_VALID_MAX}", walk=True)
                served.stop()  # requests still in flight finish before the counts are read
                return r

            stale, calls = self.phase(stale_run)
        finally:
            served.stop()
        # Stale users whose stored token now lasts past min_valid: the refreshes committed.
        after = datetime.now(UTC) + timedelta(seconds=MIN_VALID_MAX - 60)
        with self.store.engine.connect() as conn:
            done = conn.execute(select(func.count()).where(
                grants.c.openid.like("stale-%"), grants.c.access_expires_at > after)).scalar_one()
        mine = [n for o, n in calls.items() if o.startswith("stale-")]
        stale.update(refresh_calls=sum(mine), most_calls_for_one_user=max(mine, default=0),
                     users_refreshed=done, single_refresh_each=max(mine, default=0) <= 1
                     and sum(mine) == done)
        floor = self.floor_run(processes)
        return {"processes": processes, "fresh": fresh, "stale": stale, "floor": floor,
                "vs_floor": _vs_floor(fresh, floor, stale)}

    def floor_run(self, processes: int) -> dict[str, Any]:
        """The floor's fresh-token phase: as keeper's, with the sweep made due again beside."""
        a = self.args
        served = self.serve_floor(processes)
        try:
            self.wrk(served, "fresh-", 1, a.concurrency, base=self.floor_base)  # warm, as keeper
            fresh, _ = self.phase(lambda: self.wrk(served, "fresh-", a.seconds, a.concurrency,
                                                   base=self.floor_base))
        finally:
            served.stop()
        return {"processes": processes, "fresh": fresh}

    def lookups(self, n: int, concurrency: int) -> dict[str, Any]:
        """``n`` look-ups of fresh tokens by ``keeper token`` processes, ``concurrency`` at once."""

        def one(i: int) -> bool:
            openid = f"fresh-{i * 7919 % self.args.users:07d}"
            ran = subprocess.run(self.keeper("token", "--app", APPID, openid), cwd=self.workdir,
                                 env=self.env, capture_output=True, text=True, check=False)
            return ran.returncode == 0 and bool(ran.stdout.strip())

        cpu0 = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
        t0 = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            ok = list(pool.map(one, range(n)))
        seconds = time.monotonic() - t0
        cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - cpu0
        return {"concurrency": concurrency, "lookups": n, "seconds": round(seconds, 2),
                "requests_per_s": round(n / seconds, 2), "errors": ok.count(False),
                "cpu_ms_per_lookup": round(cpu * 1000 / n, 1)}


def _vs_floor(fresh: dict[str, Any], floor: dict[str, Any],
              stale: dict[str, Any]) -> dict[str, Any]:
    """Keeper's fresh figures over the floor's, and each target met or not."""
    f, t = floor["fresh"], TARGETS
    rps = round(fresh["requests_per_s"] / f["requests_per_s"], 2) if f["requests_per_s"] else None
    p99 = round(fresh["p99_ms"] / f["p99_ms"], 2) if f["p99_ms"] else None
    return {"fresh_rps_ratio": rps, "fresh_p99_ratio": p99, "meets": {
        "fresh_rps": rps is not None and rps >= t["fresh_rps_ratio_min"],
        "fresh_p99": p99 is not None and p99 <= t["fresh_p99_ratio_max"],
        # Once the stale users ran out (wrapped), the rest of the phase asked for fresh tokens.
        "stale_rps": stale["requests_per_s"] >= t["stale_rps"] and stale["single_refresh_each"]
        and not stale["wrapped"],
    }}


def _report(r: dict[str, Any]) -> str:
    def phase(name: str, x: dict[str, Any], target: str) -> str:
        return (f"  {name}, c={x['concurrency']}: {x['requests_per_s']} req/s, p50 "
                f"{x['p50_ms']} ms, p99 {x['p99_ms']} ms, max {x['max_ms']} ms, {x['errors']} "
                f"errors, API CPU {x['api_cpu_ms_per_request']} ms/request ({target}); the "
                f"sweep beside: {x['sweep_refreshes_per_s']} refreshes/s")

    s, t, f, v = r["stale"], TARGETS, r["floor"]["fresh"], r["vs_floor"]
    return "\n".join((
        f"API, {r['processes']} process(es):",
        phase("fresh", r["fresh"], f"target >= {t['fresh_rps_ratio_min']}x the floor's req/s, "
              f"p99 <= {t['fresh_p99_ratio_max']}x the floor's"),
        phase("floor fresh", f, "bare Starlette + uvicorn, same processes, one row read"),
        f"  keeper / floor, fresh: {r['fresh']['requests_per_s']} vs {f['requests_per_s']} req/s"
        f" = {v['fresh_rps_ratio']}x (target >= {t['fresh_rps_ratio_min']}x); p99 "
        f"{r['fresh']['p99_ms']} vs {f['p99_ms']} ms = {v['fresh_p99_ratio']}x (target <= "
        f"{t['fresh_p99_ratio_max']}x)",
        phase("stale", s, f"target >= {t['stale_rps']}/s, one refresh per stale grant"),
        f"  stale: {s['refresh_calls']} refresh calls for {s['users_refreshed']} users refreshed,"
        f" at most {s['most_calls_for_one_user']} for one"
        + ("" if s["single_refresh_each"] else " -- NOT one refresh each")
        + ("; stale users ran out: raise --users" if s["wrapped"] else "")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench api", description=__doc__)
    p.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    p.add_argument("--pg-server", default=PG_SERVER, help="where the bench database is made")
    p.add_argument("--processes", default="1,2", help="API processes to measure, e.g. 1,2")
    p.add_argument("--seconds", type=float, default=10, help="each measured phase")
    p.add_argument("--users", type=int, default=20000, help="fresh users, and stale users")
    p.add_argument("--sweep-grants", type=int, default=20000, help="due for the sweep")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--stale-concurrency", type=int, default=64)
    p.add_argument("--latency-ms", type=float, default=50.0, help="the simulator's")
    p.add_argument("--lookups", type=int, default=20,
                   help="keeper token subprocesses (0: none)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("python -m bench api: wrk is not installed (Debian: apt-get install wrk); "
              "nothing measured", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may start us ignoring it
        signal.signal(sig, interrupted)
    sim: Sim | None = None
    sweep: Child | None = None
    bench: Bench | None = None
    with tempfile.TemporaryDirectory(prefix="keeper-bench-api-") as tmp, \
            database(args.db, args.pg_server, Path(tmp)) as db_url:
        try:
            sim = Sim(args.latency_ms, None)
            bench = Bench(args, Path(tmp), db_url, sim)
            say(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.db}; "
                f"{args.users} fresh and {args.users} stale users, {args.sweep_grants} due for a "
                f"keeper run beside; WeChat (simulator) at {args.latency_ms:g} ms")
            sweep = bench.child("run", "run")
            runs = []
            for processes in (int(x) for x in args.processes.split(",")):
                runs.append(bench.api_run(processes))
                say(_report(runs[-1]))
            subs = []
            for c in sorted({1, args.concurrency}) if args.lookups > 0 else ():
                subs.append(bench.phase(partial(bench.lookups, args.lookups, c))[0])
                say(f"keeper token subprocess, c={c}: {subs[-1]['requests_per_s']} look-ups/s, "
                    f"{subs[-1]['cpu_ms_per_lookup']} CPU ms each ({subs[-1]['errors']} errors)")
            for r in runs:
                r["fresh_vs_subprocess"] = {f"c{s['concurrency']}": round(
                    r["fresh"]["requests_per_s"] / s["requests_per_s"]) for s in subs}
                say(f"API ({r['processes']} process(es)) / subprocess: " + ", ".join(
                    f"{v}x at c={k[1:]}" for k, v in r["fresh_vs_subprocess"].items()))
            print(json.dumps({"db": args.db, "load_average": os.getloadavg(), "users": args.users,
                              "sweep_grants": args.sweep_grants, "latency_ms": args.latency_ms,
                              "targets": TARGETS, "api": runs, "subprocess": subs}))
        except KeyboardInterrupt:
            print("python -m bench api: interrupted; cleaning up", file=sys.stderr)
            return 130
        finally:
            if sweep is not None:
                sweep.stop()
            if sim is not None:
                sim.close()
            if bench is not None:
                bench.store.close()
    return 0
