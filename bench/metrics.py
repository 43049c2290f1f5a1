"""``python -m bench metrics``: what metrics cost.

1. The sweep's refreshes per second with metrics off and on, in one run, alternated (off,
   on, off, on...) so drift on a shared machine falls on both. "On" is what ``keeper run``
   does with ``metrics_listen`` set: process metrics recorded and the database collector
   renewing its read every 5 s, with the listener scraped every second (Prometheus's
   default is every 15 s).
2. A database holding ``--scrape-grants`` grants (1,000,000 by default), put there with one
   INSERT ... SELECT, not through keeper: the database read behind the gauges (every scrape
   reading, no cache), and scrapes through the HTTP listener as keeper serves them (the
   first waits for a read; later ones are answered from the read renewed in the background).

Prints the figures beside the targets (within 5 %; under 200 ms), as text and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from cryptography.fernet import Fernet
from sqlalchemy import text

from bench.env import database
from bench.sweep import run_once
from keeper.config import build_config
from keeper.crypto import Cipher
from keeper.log import configure
from keeper.metrics import process
from keeper.observe.collector import DatabaseCollector
from keeper.observe.exposition import MetricsServer, registry_for
from keeper.service.runtime import Runtime
from keeper.store import db
from keeper.store.grants import Store

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
APPS = ("wxbenchapp000000a", "wxbenchapp000000b", "wxbenchapp000000c")
SCRAPE_EVERY_S = 1.0


@contextlib.contextmanager
def scraped(rt: Runtime) -> Iterator[None]:
    """keeper run's listener on a free port, scraped every second while the sweep runs."""
    process.enable()
    collector = DatabaseCollector(store=lambda: rt.store, config=lambda: rt.config)
    server = MetricsServer("127.0.0.1", 0, registry_for(collector),
                           on_close=collector.close).start()
    done = threading.Event()

    def scrape() -> None:
        with requests.Session() as http:
            while not done.wait(SCRAPE_EVERY_S):
                http.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)

    scraper = threading.Thread(target=scrape, name="scraper", daemon=True)
    scraper.start()
    try:
        yield
    finally:
        done.set()
        scraper.join()
        server.close()
        process.enable(False)


def sweep_cost(args: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(2 * args.rounds):
        mode = "off" if i % 2 == 0 else "on"
        process.enable(False)
        r = run_once(grants=args.grants, latency_ms=args.latency_ms, workers=args.workers,
                     quota=None, database_url=None, around=scraped if mode == "on" else None)
        rates[mode].append(r["refreshes_per_s"])
        print(f"  metrics {mode}: {r['refreshes']} refreshes in {r['seconds']} s = "
              f"{r['refreshes_per_s']}/s", flush=True)
    off, on = statistics.mean(rates["off"]), statistics.mean(rates["on"])
    off_m, on_m = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"grants": args.grants, "rounds": args.rounds, "off_per_s": rates["off"],
            "on_per_s": rates["on"], "off_mean": round(off, 1), "on_mean": round(on, 1),
            "difference_pct": round(100 * (off - on) / off, 2),
            "median_difference_pct": round(100 * (off_m - on_m) / off_m, 2)}


def fill(url: str, n: int) -> None:
    """``n`` grants over three apps (90 % active, 5 % expiring, 5 % dead with a record),
    lifetimes ending over the coming 30 days, work due for 1 %; 100 sweeps; quota rows.
    Tokens are 200 characters of filler, as wide as encrypted ones."""
    engine = db.make_engine(url, timeout_s=0)
    db.upgrade(engine)
    now = datetime.now(UTC)
    pg = engine.dialect.name == "postgresql"
    series = ("SELECT i FROM generate_series(1, :n) AS i" if pg else
              "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n) "
              "SELECT i FROM s")
    ts = ("(CAST(:now AS timestamptz) + (({x}) * interval '1 second'))" if pg else
          "strftime('%Y-%m-%d %H:%M:%f', :now, ({x}) || ' seconds')")
    state = "CASE WHEN i % 20 = 0 THEN 'reauth' WHEN i % 20 = 1 THEN 'expiring' ELSE 'active' END"
    issued = ts.format(x="-(i % 2592000) - 86400")
    due = f"CASE WHEN i % 20 = 0 THEN NULL WHEN i % 100 = 2 THEN {ts.format(x='-600')} " \
          f"ELSE {ts.format(x='(i % 86400) + 60')} END"
    apps = f"CASE i % 3 WHEN 0 THEN '{APPS[0]}' WHEN 1 THEN '{APPS[1]}' ELSE '{APPS[2]}' END"
    pad = "'" + "x" * 200 + "'"
    sql = (f"INSERT INTO grants (appid, openid, scope, access_token, refresh_token, "
           f"access_expires_at, refresh_issued_at, state, failures, profile_failures, "
           f"refresh_due_at, access_due_at, created_at, updated_at) "
           f"SELECT {apps}, 'bench-' || i, 'snsapi_base', {pad}, {pad}, "
           f"{ts.format(x='3600')}, {issued}, {state}, 0, 0, {due}, {due}, "
           f"{ts.format(x='0')}, {ts.format(x='0')} FROM ({series}) AS n")
    stamp = now.isoformat() if pg else now.replace(tzinfo=None).isoformat(sep=" ")
    with engine.begin() as conn:
        conn.execute(text(sql), {"n": n, "now": stamp})
        conn.execute(text("INSERT INTO reauth (grant_id, reason, errcode, since, seq, appid) "
                          "SELECT id, 'authorization_revoked', 42007, created_at, id, appid "
                          "FROM grants WHERE state = 'reauth'"))
        conn.execute(text("INSERT INTO sweeps (started_at, finished_at, host, pid, summary) "
                          "SELECT created_at, created_at, 'bench', 1, '{\"seconds\": 1}' "
                          "FROM grants WHERE id <= 100"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # What autovacuum does on its own after a bulk load: statistics, and on PostgreSQL
        # the visibility map that lets an index-only scan skip the table.
        conn.execute(text("VACUUM ANALYZE" if pg else "ANALYZE"))
    engine.dispose()


def scrape_cost(kind: str, n: int, repeat: int, workdir: Path) -> dict[str, Any]:
    with database(kind, PG_SERVER, workdir) as url:
        t0 = time.monotonic()
        fill(url, n)
        filled_s = time.monotonic() - t0
        config = build_config({"database_url": url, "apps": [{"appid": a} for a in APPS]},
                              env={}, source=str(workdir / "bench.toml"))
        store = Store(url, cipher=Cipher([Fernet.generate_key()]), auto_upgrade=False)
        uncached = DatabaseCollector(store=lambda: store, config=lambda: config, ttl_s=0)
        reads = []
        for _ in range(repeat):
            reads.append(uncached.snapshot().seconds)
        grants = sum(uncached.snapshot().grants.values())
        collector = DatabaseCollector(store=lambda: store, config=lambda: config)
        server = MetricsServer("127.0.0.1", 0, registry_for(collector),
                               on_close=collector.close).start()
        scrapes = []
        try:
            with requests.Session() as http:
                for _ in range(repeat + 1):
                    t = time.perf_counter()
                    http.get(f"http://127.0.0.1:{server.port}/metrics",
                             timeout=30).raise_for_status()
                    scrapes.append(time.perf_counter() - t)
                    time.sleep(SCRAPE_EVERY_S)  # a scraper's pace, not a wait for a result
        finally:
            server.close()
            store.close()
    return {"database": kind, "grants": grants, "filled_s": round(filled_s, 1),
            "database_read_ms": _ms(reads), "first_scrape_ms": round(1000 * scrapes[0], 1),
            "scrape_ms": _ms(scrapes[1:])}


def _ms(seconds: list[float]) -> dict[str, float]:
    return {"median": round(1000 * statistics.median(seconds), 1),
            "max": round(1000 * max(seconds), 1)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grants", type=int, default=20000, help="grants due per sweep")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="sweeps with metrics off and on each")
    p.add_argument("--scrape-grants", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=10, help="uncached scrapes measured")
    p.add_argument("--databases", default="sqlite,postgresql")
    args = p.parse_args(argv)
    configure("warning")
    result: dict[str, Any] = {}
    if args.rounds > 0:
        print(f"sweeps: {args.grants} grants due, {args.latency_ms:g} ms latency, "
              f"{args.workers} workers, metrics off and on alternated ...", flush=True)
        result["sweep"] = s = sweep_cost(args)
        print(f"  mean {s['off_mean']}/s off, {s['on_mean']}/s on: {s['difference_pct']} % "
              f"(medians: {s['median_difference_pct']} %; target: within 5 %)", flush=True)
    result["scrape"] = []
    for kind in filter(None, args.databases.split(",")):
        print(f"scrape: {args.scrape_grants} grants on {kind} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="keeper-bench-metrics-") as tmp:
            r = scrape_cost(kind, args.scrape_grants, args.repeat, Path(tmp))
        result["scrape"].append(r)
        print(f"  filled in {r['filled_s']} s; database read {r['database_read_ms']} ms; "
              f"first scrape {r['first_scrape_ms']} ms, then {r['scrape_ms']} ms "
              "(target: under 200 ms)", flush=True)
    print(json.dumps(result))
    return 0
