"""``python -m bench events``: events delivered per second to a loopback receiver that answers at
once, and the delay from a re-authorization's commit to its delivery while a sweep runs.

Phase 1 records ``--events`` events in one transaction and times ``keeper events deliver``'s
loop sending them (one at a time, as for any one webhook). Phase 2 sweeps ``--grants`` due
grants against the simulator (in its own process, ``--latency-ms`` a call), every
``--reauth-every``-th user's refresh answered 40030, with the delivery thread running as in
``keeper run``; each event's delay is its arrival at the receiver minus the time the sweep
wrote its record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import select

from bench.env import Sim
from bench.seed import APPID, grant_rows, store_grants
from keeper.config import build_config
from keeper.core.events import reauth_recorded
from keeper.core.models import Reauth
from keeper.crypto import create_key_file
from keeper.events.deliverer import Deliverer
from keeper.log import configure
from keeper.service.runtime import Runtime, cipher_for
from keeper.store.events import record_events
from keeper.store.grants import Store
from keeper.store.schema import events


class Receiver:
    """Answers 204 at once and notes when each event id arrived (wall clock)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        arrived = self.arrived

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrived.setdefault(self.headers.get("Keeper-Event-Id", ""), time.time())
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run(*, n_events: int, grants: int, latency_ms: float, workers: int,
        database_url: str | None, reauth_every: int) -> dict[str, Any]:
    receiver = Receiver()
    sim = Sim(latency_ms, None)
    tmp = tempfile.TemporaryDirectory(prefix="keeper-bench-events-")
    try:
        url = database_url or f"sqlite:///{tmp.name}/bench.db"
        key_file = Path(tmp.name) / "bench.key"
        create_key_file(key_file)
        config = build_config({
            "database_url": url, "api_base": sim.url, "workers": workers,
            "encryption_key_file": str(key_file), "log_level": "warning",
            "apps": [{"appid": APPID}], "quotas": {"refresh": "none"},
            "webhooks": [{"url": receiver.url, "secret_env": "BENCH_HOOK"}],
        }, env={"BENCH_HOOK": "bench-webhook-secret"}, source="bench")
        store = Store(url, cipher=cipher_for(config), auto_upgrade=True).open()
        hook = config.webhooks[0]
        # Phase 1: throughput of one webhook's loop.
        d = Deliverer(store=store, webhooks=config.webhooks, stop=threading.Event(),
                      retention_s=config.events_retention_s)
        d.deliver_all()  # the webhook's row: it starts at the newest event
        now = datetime.now(UTC)
        with store.engine.begin() as conn:
            record_events(conn, [reauth_recorded(APPID, f"t{i}", None, Reauth("other", 1, now))
                                 for i in range(n_events)], now)
        t0 = time.monotonic()
        counts = d.deliver_all()
        seconds = time.monotonic() - t0
        d.close()
        # Phase 2: a sweep recording re-authorizations, the delivery thread beside it.
        rows = grant_rows(grants, time.time())
        sim.seed(rows)
        with requests.Session() as http:
            for r in rows[::reauth_every]:
                http.post(f"{sim.url}/_sim/script", json={
                    "openid": r["openid"], "endpoint": "refresh", "answer": 40030},
                    timeout=30).raise_for_status()
        store = Store(url, cipher=cipher_for(config), auto_upgrade=True).open()
        store_grants(store, rows, config.lifetime(config.apps[0]),
                      access_expires_at=datetime.now(UTC))
        top = store.events_top()
        store.close()
        rt = Runtime.build(config)
        deliverer = rt.deliverer()
        sweeper = rt.sweeper()
        sweeper.on_written = deliverer.poke
        deliverer.start()
        s0 = time.monotonic()
        summary = sweeper.run_once()
        sweep_s = time.monotonic() - s0
        with rt.store.engine.connect() as conn:
            made = {r.id: r.created_at.timestamp() for r in conn.execute(
                select(events.c.id, events.c.created_at).where(events.c.seq > top))}
        deadline = time.monotonic() + 120
        while not set(made) <= set(receiver.arrived) and time.monotonic() < deadline:
            time.sleep(0.05)  # the benchmark waits for the receiver, polling its record
        rt.stop.set()
        deliverer.join(time.monotonic() + 10)
        deliverer.close()
        sweeper.close()
        rt.close()
        delays = [receiver.arrived[i] - t for i, t in made.items() if i in receiver.arrived]
    finally:
        sim.close()
        receiver.close()
        tmp.cleanup()
    return {
        "database": "sqlite" if url.startswith("sqlite") else "postgresql",
        "events": n_events, "delivered": counts["delivered"], "seconds": round(seconds, 2),
        "events_per_s": round(counts["delivered"] / seconds, 1) if seconds else None,
        "sweep_grants": grants, "sweep_s": round(sweep_s, 2),
        "reauth_recorded": summary["reauth_recorded"], "sweep_events": len(made),
        "sweep_events_delivered": len(delays),
        "delay_p50_ms": round(statistics.median(delays) * 1000, 1) if delays else None,
        "delay_p99_ms": round(_pct(delays, 99) * 1000, 1) if delays else None,
        "delay_max_ms": round(max(delays) * 1000, 1) if delays else None,
        "webhook": hook.key,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench events", description=__doc__)
    p.add_argument("--events", type=int, default=2000, help="events of the throughput phase")
    p.add_argument("--grants", type=int, default=3000, help="due grants swept")
    p.add_argument("--reauth-every", type=int, default=10, metavar="N",
                   help="WeChat answers 40030 to every Nth user (1: all of them)")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    args = p.parse_args(argv)
    configure("warning")
    r = run(n_events=args.events, grants=args.grants, latency_ms=args.latency_ms,
            workers=args.workers, database_url=args.database_url,
            reauth_every=args.reauth_every)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['database']}: {r['delivered']} of {r['events']} events delivered in "
          f"{r['seconds']} s = {r['events_per_s']} events/s (one webhook, one at a time)")
    print(f"during a sweep of {r['sweep_grants']} grants ({r['sweep_s']} s, "
          f"{r['reauth_recorded']} re-authorizations recorded): {r['sweep_events_delivered']} "
          f"of {r['sweep_events']} events delivered; commit to delivery p50 "
          f"{r['delay_p50_ms']} ms, p99 {r['delay_p99_ms']} ms, max {r['delay_max_ms']} ms")
    print(json.dumps(r))
    return 0
