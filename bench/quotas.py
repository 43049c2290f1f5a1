"""``python -m bench quotas``: how much of a refresh quota's rate keeper uses under a backlog,
by quota size, processes sharing it and database.

A grid of cells, each one run of :class:`bench.hosts_run.Bench`: ``--processes`` ``keeper
run`` processes (plain processes on loopback, ``--workers`` each) sharing one database (a
SQLite file, or a PostgreSQL database of the bench's own, dropped at the end) and one
``--quotas`` refresh quota, calling a simulator that adds ``--latency-ms`` to every call and
enforces the same quota. The processes are started and idle before the grants fall due. A
cell lasts ``--windows`` quota windows of calls (``windows * N`` calls for ``N/P``, counted
at the simulator, at least MIN_CALLS), then its processes are stopped. Due are two windows'
worth more than that, and a claim's page more for each process
(:data:`keeper.sweep.engine.MIN_PAGE`, or two workers' worth), so the backlog outlasts the
cell: every process holds grants and asks for permits until the end. (A process claims up to a
page at once: had only ``windows * N`` been due, one process would have worked all of a small
quota's grants alone, and processes that ran out would sit idle through the last windows.)

Counted where WeChat counts, by arrival at the simulator: the **share** of the quota's rate
is the steady rate (between the 10th and the 90th percentile arrival) over ``N/P``; the
**busiest window** is the most arrivals in any window of length ``P`` (never above ``N``),
and the **N+1 span** the shortest time in which ``N + 1`` calls arrived (a window held one call
too many when it is under ``P``: how close the cell came).
Beside the share: **schedule**, what the quota arithmetic in place gives the same backlog
on its own (:func:`schedule_pct`: no threads, no database, no calls), and **promise**, the
most any schedule can give while keeping its promise (``P / (P + slack) * (N - burst) / N``,
:mod:`keeper.core.quota`). The targets: at least 90 % for quotas of 10 a window and more,
the promise's share below that.

Prints a line per cell as it ends, then the table and one JSON line with every figure. Exits 1
if a window held more calls than the quota, WeChat (the simulator) answered 45011, or a grant
was refreshed more than once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.env import database
from bench.hosts_run import Bench
from bench.net import BridgeSim, Place
from keeper.core.quota import Gcra, Quota, parse_quota, take
from keeper.sweep.engine import MIN_PAGE

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_QUOTAS = ("2/1 seconds", "5/2 seconds", "10/2 seconds", "20/2 seconds", "100/2 seconds",
                  "480/2 seconds")
QUICK_QUOTAS = ("2/1 seconds", "10/2 seconds", "100/2 seconds")
DEFAULT_WINDOWS, QUICK_WINDOWS = 6.0, 4.0
#: Quotas of at least this many calls a window should get at least TARGET_PCT of their rate.
TARGET_COUNT, TARGET_PCT = 10, 90.0
#: The fewest calls a cell lasts: the steady rate leaves a tenth out at each end, and a few
#: intervals between permits are too few to measure one by.
MIN_CALLS = 16
_US = 1_000_000


def schedule_pct(quota: Quota, takers: int) -> float:
    """The share (%) of ``quota``'s rate the quota arithmetic in place gives a backlog on its
    own: ``takers`` each asking for as many permits as a take grants, again at once when
    granted and exactly when told, counted after the first period (whose burst is spent).
    What keeper's gate would get with no thread wake-up, database round trip or call between
    a permit's moment and its take."""
    params = Gcra.for_quota(quota)
    period_us = round(quota.period_s * _US)
    periods = 1 + max(5, math.ceil(2000 / quota.count))  # 2,000 permits or more counted
    start = 1_000 * _US
    end = start + periods * period_us
    tat, counted = 0, 0
    asks = [start + i for i in range(takers)]  # the next moment each taker asks
    while True:
        i = min(range(takers), key=asks.__getitem__)
        now = asks[i]
        if now >= end:
            return 100 * counted / ((periods - 1) * quota.count)
        decision = take(params, tat, now, params.max_take)
        if decision.granted:
            tat = decision.new_tat_us
            counted += decision.granted if now >= start + period_us else 0
        else:
            asks[i] = now + max(1, round(decision.wait_s * _US))


def promise_pct(quota: Quota) -> float:
    """The most of ``quota``'s rate (%) a backlog can get while no window of ``P`` by arrival
    holds more than ``N``, with the slack and burst the code in place reserves."""
    params = Gcra.for_quota(quota)
    burst = params.max_take - 1
    return (100 * quota.period_s / (quota.period_s + params.slack_s)
            * (quota.count - burst) / quota.count)


def cell_calls(quota: Quota, windows: float) -> int:
    """The calls a cell lasts: ``windows`` of the quota's count (at least MIN_CALLS)."""
    return max(MIN_CALLS, math.ceil(windows * quota.count))


def cell_grants(quota: Quota, processes: int, windows: float, page: int) -> int:
    """Grants due in a cell: its calls, two windows more (the calls made while the processes
    stop, and a margin) and a page for each process (what a process holds when the cell
    ends), so that no process runs out of grants before then."""
    return cell_calls(quota, windows) + 2 * quota.count + processes * page


def _cell(kind: str, quota: Quota, processes: int, grants: int, figures: dict[str, Any],
          seconds: float) -> dict[str, Any]:
    return {"database": kind, "quota": str(quota), "count": quota.count,
            "period_s": quota.period_s, "processes": processes, "grants_due": grants,
            "share_pct": figures["quota_used_pct"],
            "schedule_pct": round(schedule_pct(quota, processes), 1),
            "promise_pct": round(promise_pct(quota), 1),
            "busiest_window": figures["max_sliding_window"],
            "cell_seconds": round(seconds, 1), **figures}


COLUMNS = (("database", 10), ("quota", 14), ("processes", 9), ("calls", 5),
           ("by process", 12), ("share", 7), ("schedule", 8), ("promise", 7),
           ("busiest/count", 13), ("N+1 span", 8), ("45011", 5), ("twice", 5))


def table(cells: Sequence[dict[str, Any]]) -> str:
    def row(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i > 1 else v.ljust(w)
                         for i, (v, (_, w)) in enumerate(zip(values, COLUMNS, strict=True)))

    lines = [row([name for name, _ in COLUMNS])]
    for c in cells:
        lines.append(row([
            c["database"], c["quota"], str(c["processes"]), str(c["calls"]),
            "/".join(str(n) for n in c["refreshed_by_host"]), f"{c['share_pct']:.1f} %",
            f"{c['schedule_pct']:.1f} %", f"{c['promise_pct']:.1f} %",
            f"{c['busiest_window']}/{c['count']}", f"{c.get('closest_span_s', 0):.3f}",
            str(c["quota_rejected"]),
            str(c["refreshed_more_than_once"])]))
    return "\n".join(lines)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench quotas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quotas", default=None,
                   help=f"refresh quotas, comma-separated (default: {', '.join(DEFAULT_QUOTAS)})")
    p.add_argument("--processes", default="1,3", help="keeper run processes per cell")
    p.add_argument("--databases", default="sqlite,postgresql",
                   help="sqlite (one file the processes share) and/or postgresql")
    p.add_argument("--windows", type=float, default=None,
                   help=f"grants due per cell, in quota windows (default {DEFAULT_WINDOWS:g})")
    p.add_argument("--workers", type=int, default=16, help="workers per process")
    p.add_argument("--latency-ms", type=float, default=30.0, help="WeChat's latency")
    p.add_argument("--database-server", default=PG_SERVER,
                   help="a PostgreSQL server; the bench makes a database there and drops it")
    p.add_argument("--quick", action="store_true",
                   help=f"{', '.join(QUICK_QUOTAS)} and {QUICK_WINDOWS:g} windows "
                        "(unless given)")
    args = p.parse_args(argv)
    quotas = [parse_quota(q) for q in _list(args.quotas or ",".join(
        QUICK_QUOTAS if args.quick else DEFAULT_QUOTAS))]
    windows = args.windows or (QUICK_WINDOWS if args.quick else DEFAULT_WINDOWS)
    processes = [int(n) for n in _list(args.processes)]
    kinds = _list(args.databases)
    if not quotas or not processes or min(processes) < 1 or windows <= 0:
        p.error("give at least one quota, and process counts and windows above 0")
    if set(kinds) - {"sqlite", "postgresql"} or not kinds:
        p.error("--databases: sqlite and/or postgresql")
    page = max(MIN_PAGE, 2 * args.workers)
    most = max(cell_grants(q, n, windows, page) for q in quotas for n in processes)
    # Bench writes a config for each of `hosts` processes and seeds `most` grants once.
    shape = argparse.Namespace(hosts=max(processes), workers=args.workers,
                               latency_ms=args.latency_ms, grants_per_host=0)
    where = Place(None, "127.0.0.1")
    described = "keeper run processes on this machine, on loopback"
    print(f"quotas: {len(quotas) * len(processes) * len(kinds)} cells; {described}; "
          f"workers {args.workers} a process at {args.latency_ms:g} ms; a cell lasts {windows:g} "
          f"windows of calls (at least {MIN_CALLS}), with {page} grants more due for each "
          "process", flush=True)
    cells: list[dict[str, Any]] = []
    began = time.monotonic()
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="keeper-bench-quotas-") as tmp, \
                database(kind, args.database_server, Path(tmp)) as url:
            sim = BridgeSim(where.address, args.latency_ms)
            try:
                bench = Bench(shape, Path(tmp), url, where, sim, None, grants=most)
                try:
                    for quota in quotas:
                        for n in processes:
                            grants = cell_grants(quota, n, windows, page)
                            calls = cell_calls(quota, windows)
                            # Generous: the code before the fix used a fifth of a small quota.
                            timeout = 60 + 8 * calls * quota.period_s / quota.count
                            t0 = time.monotonic()
                            run = bench.run(f"{kind} {quota} x{n}", n, str(quota),
                                            grants=grants, calls=calls, timeout_s=timeout)
                            c = _cell(kind, quota, n, grants, run.figures,
                                      time.monotonic() - t0)
                            cells.append(c)
                            print(f"  {kind} {quota}, {n} process{'es' if n > 1 else ''}: "
                                  f"{c['calls']} calls, {c['share_pct']} % of the quota's "
                                  f"rate "
                                  f"(schedule {c['schedule_pct']} %, promise "
                                  f"{c['promise_pct']} %), busiest window "
                                  f"{c['busiest_window']}/{quota.count}, "
                                  f"{c['quota_rejected']} answered 45011 "
                                  f"({c['cell_seconds']} s)", flush=True)
                finally:
                    bench.close()
            finally:
                sim.close()
    seconds = time.monotonic() - began
    print(table(cells), flush=True)
    big = [c["share_pct"] for c in cells if c["count"] >= TARGET_COUNT]
    small = [c for c in cells if c["count"] < TARGET_COUNT]
    met = min(big) >= TARGET_PCT if big else None
    if big:
        print(f"quotas of {TARGET_COUNT} a window and more: lowest share {min(big)} % (target "
              f"{TARGET_PCT:g} %: {'met' if met else 'NOT met'})", flush=True)
    if small:
        low = min(small, key=lambda c: c["share_pct"] - c["promise_pct"])
        print(f"quotas under {TARGET_COUNT}: lowest share {low['share_pct']} % against a "
              f"promise of {low['promise_pct']} % ({low['quota']}, {low['processes']} "
              f"process{'es' if low['processes'] > 1 else ''})", flush=True)
    print(f"{len(cells)} cells in {seconds:.0f} s", flush=True)
    wrong = [f"{c['database']} {c['quota']} x{c['processes']}: {what}" for c in cells
             for what, bad in (
                 ("a window held more calls than the quota", c["busiest_window"] > c["count"]),
                 ("WeChat answered 45011", c["quota_rejected"] > 0),
                 ("a grant was refreshed more than once", c["refreshed_more_than_once"] > 0),
                 ("a call failed", c["ok"] != c["calls"]))
             if bad]
    print(json.dumps({"where": described, "workers": args.workers,
                      "latency_ms": args.latency_ms, "windows": windows, "page": page,
                      "seconds": round(seconds, 1), "target_met": met, "wrong": wrong,
                      "cells": cells}))
    if wrong:
        print(f"wrong: {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
