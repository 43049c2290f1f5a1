"""``python -m bench hosts``: how refresh throughput grows with hosts, and how hosts share a quota.

Builds test hosts (network namespaces on a bridge of the bench's own, :mod:`bench.netns`;
needs root), each running ``keeper run`` against one PostgreSQL database of the bench's own,
reached over the bridge through a forwarder, and calling a simulator that listens on the bridge
and adds WeChat's latency to every call. Three runs over access-expired grants:

1. **one host**, no quota: the refreshes per second one host makes;
2. **all hosts** (default 3), no quota, the same number of grants per host: the ratio to run 1
   (the target: at least 2.7 with 3 hosts);
3. **all hosts with the quota binding**: the share of the quota's rate they use together (the
   target: at least 95 %), and the busiest quota window at the simulator (never above it).

Rates are counted where WeChat would count them, at the simulator, from each call's arrival:
the steady rate between the 10th and the 90th percentile arrival (start-up and the last few
calls left out), and the whole run's. The hosts are started and idle before the grants fall
due, so each run measures refreshing, not starting Python. Per host it prints the CPU it used
(a host limited by WeChat's latency uses a fraction of a core and makes close to
``workers / latency`` calls a second), and the machine's CPU busy share.

Where namespaces cannot be made (not root), ``--loopback`` runs the hosts as plain processes
in this namespace instead (said in the output). Exits 1 if a grant was refreshed other than
once, a call was answered 45011 or a quota window held more calls than the quota.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from sqlalchemy import make_url

from bench.env import database
from bench.hosts_run import Bench, Run
from bench.net import BridgeSim, ChildProcess, place, serve_forwarder
from keeper.core.quota import parse_quota

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TARGETS = {"scaling_ratio": 2.7, "quota_used_pct": 95.0}


def _print_run(r: Run, bench: Bench) -> None:
    f = r.figures
    head = (f"{r.name}: {r.hosts} host{'s' if r.hosts > 1 else ''}, {r.grants} grants due, "
            f"workers {bench.args.workers} at {bench.args.latency_ms:g} ms, "
            f"quota {r.quota or 'none'}")
    print(head, flush=True)
    print(f"  {f['calls']} refresh calls ({f['ok']} ok, {f['quota_rejected']} answered 45011, "
          f"{f['refreshed_other_than_once']} grants refreshed other than once); "
          f"{f['refreshes_per_s']} refreshes/s steady, {f['whole_run_per_s']}/s over the whole "
          f"run ({f['seconds_of_calls']} s of calls)", flush=True)
    print(f"  per host {f['per_host_share_of_latency_bound_pct']} % of the latency bound "
          f"({f['latency_bound_per_host']}/s); host CPU {f['host_cpu_share_of_a_core_pct']} % "
          f"of a core, {f['host_cpu_ms_per_refresh']} ms per refresh; machine busy "
          f"{f['machine_cpu_busy_pct']} % (simulator {f['simulator_cpu_share_of_a_core_pct']} % "
          f"of a core, forwarder {f['forwarder_cpu_share_of_a_core_pct']} %); "
          f"busiest window {f['max_sliding_window']}"
          + (f" (quota {f['quota_count']}); {f['quota_used_pct']} % of the quota's rate "
             f"({f['quota_rate_per_s']}/s) used" if r.quota else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench hosts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--workers", type=int, default=8, help="workers per host")
    p.add_argument("--latency-ms", type=float, default=50.0, help="WeChat's latency")
    p.add_argument("--grants-per-host", type=int, default=3000,
                   help="grants due per host in each run")
    p.add_argument("--quota", default=None,
                   help="refresh quota of the bound run (default: half of what the hosts "
                        "could do, over a 2 s window)")
    p.add_argument("--database-server", default=PG_SERVER,
                   help="a PostgreSQL server; the bench makes a database there and drops it")
    p.add_argument("--loopback", action="store_true",
                   help="run the hosts as processes in this namespace (no root needed)")
    args = p.parse_args(argv)
    if args.hosts < 2:
        p.error("--hosts must be 2 or more")
    bound = args.workers * 1000.0 / args.latency_ms
    quota = args.quota or f"{round(bound * args.hosts)}/2 seconds"  # half the hosts' rate
    parse_quota(quota)
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="keeper-bench-hosts-") as tmp, \
            place(args.hosts, args.loopback) as where:
        workdir = Path(tmp)
        print(f"hosts: {where.describe}", flush=True)
        sim = BridgeSim(where.address, args.latency_ms)
        server = make_url(args.database_server)
        forward = ChildProcess(serve_forwarder, where.address,
                                (server.host or "127.0.0.1", server.port or 5432))
        try:
            with database("postgresql", args.database_server, workdir) as url:
                bench = Bench(args, workdir, url, where, sim, forward)
                try:
                    for name, hosts, q in (("one", 1, None), ("all", args.hosts, None),
                                           ("bound", args.hosts, quota)):
                        runs[name] = bench.run(name, hosts, q)
                        _print_run(runs[name], bench)
                finally:
                    bench.close()
        finally:
            forward.close()
            sim.close()
    one, every, bound_run = (runs[k].figures for k in ("one", "all", "bound"))
    ratio = every["refreshes_per_s"] / one["refreshes_per_s"]
    met = {"scaling_ratio": ratio >= TARGETS["scaling_ratio"] * (args.hosts / 3),
           "quota_used_pct": bound_run["quota_used_pct"] >= TARGETS["quota_used_pct"]}
    print(f"scaling: {args.hosts} hosts make {ratio:.2f}x the refreshes/s of one "
          f"(target {TARGETS['scaling_ratio'] * args.hosts / 3:.2f}: "
          f"{'met' if met['scaling_ratio'] else 'NOT met'}); bound: "
          f"{bound_run['quota_used_pct']} % of the quota used (target "
          f"{TARGETS['quota_used_pct']:g} %: {'met' if met['quota_used_pct'] else 'NOT met'}), "
          f"busiest window {bound_run['max_sliding_window']} of {bound_run['quota_count']}",
          flush=True)
    print(json.dumps({"hosts": args.hosts, "workers": args.workers,
                      "latency_ms": args.latency_ms, "where": where.describe,
                      "ratio": round(ratio, 3), "targets_met": met,
                      "runs": {k: {"hosts": r.hosts, "grants": r.grants, **r.figures}
                               for k, r in runs.items()}}))
    wrong = [k for k, r in runs.items() if r.figures["refreshed_other_than_once"]
             or r.figures["quota_rejected"] or r.figures["calls"] != r.grants]
    if bound_run["max_sliding_window"] > bound_run["quota_count"]:
        wrong.append("bound: a quota window held more calls than the quota")
    if wrong:
        print(f"wrong: {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
