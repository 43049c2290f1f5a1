"""The database's side of ``/metrics``: a Prometheus collector that reads a few cheap, indexed
counts at scrape time and keeps them for ``ttl_s`` seconds, so scrapes from several
Prometheus servers (or a refreshing dashboard) cost the database one read per few seconds.

The counts are the ones ``keeper status`` gives, by app: their sums agree with
``keeper status --json`` read at the same moment (``keeper_grants`` with ``grants``,
``keeper_reauth_records`` with ``reauth_required``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keeper.clock import utcnow
from keeper.config import Config
from keeper.core.models import ACTIVE, EXPIRING, REAUTH
from keeper.errors import StoreError
from keeper.observe.report import quota_use
from keeper.store.grants import Store

log = structlog.get_logger("keeper.metrics")

#: How often the read is renewed while scrapes come (in the background).
TTL_S = 5.0
#: The oldest read a scrape is answered with (the contract allows 10 s of lag): older, and
#: the scrape waits for a new read.
MAX_AGE_S = 10.0
#: Background reads stop when nothing has scraped for this long.
IDLE_S = 60.0
STATES = (ACTIVE, EXPIRING, REAUTH)
REASONS = ("refresh_token_invalid", "refresh_token_expired", "authorization_revoked",
           "refresh_token_expiring", "other")



@dataclass
class Snapshot:
    """One read of the database."""

    grants: dict[tuple[str, str], int] = field(default_factory=dict)
    reauth: dict[tuple[str, str], int] = field(default_factory=dict)
    due: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    last_sweep: datetime | None = None
    quota: list[tuple[str, str, int, int]] = field(default_factory=list)  # app, ep, used, limit
    events: dict[str, int] = field(default_factory=dict)  # events_pending, events_failed
    seconds: float = 0.0
    ok: bool = True


class DatabaseCollector(Collector):
    """Gauges read from the database. ``store``: the store to read (a callable, so a
    reloaded service's new store is used).

    A scrape is answered from the last read. While scrapes keep coming, a thread renews the
    read every ``ttl_s``, so a scrape never waits for the database (at 1,000,000 grants the
    read takes about 200 ms); one that finds the read older than ``MAX_AGE_S`` (the first,
    or after an idle spell) waits for a new one. ``ttl_s=0``: every scrape reads, in its
    own thread (tests and the benchmark's measurement of the read).
    """

    def __init__(self, *, store: Callable[[], Store], config: Callable[[], Config],
                 ttl_s: float = TTL_S, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.config = config
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()  # one read at a time; scrapes wait for it
        self._cached: Snapshot | None = None
        self._read_at = 0.0  # monotonic
        self._said_failure = False
        self._scraped_at = 0.0
        self._closed = threading.Event()
        self._thread_lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    @property
    def last(self) -> Snapshot | None:
        """The read scrapes are answered from now (``None`` before the first)."""
        return self._cached

    def snapshot(self) -> Snapshot:
        """The read to answer a scrape with: the last one, or a new one when that is too
        old. Concurrent scrapes wait for one read instead of each making their own."""
        self._scraped_at = time.monotonic()
        limit = MAX_AGE_S if self.ttl_s > 0 else 0.0
        cached = self._cached
        if cached is None or time.monotonic() - self._read_at >= limit:
            # Not behind the lock when the last read will do: a scrape does not wait for a
            # background read in progress.
            with self._lock:
                if self._cached is None or time.monotonic() - self._read_at >= limit:
                    self._renew()
                cached = self._cached
        if self.ttl_s > 0:
            self._keep_fresh()
        assert cached is not None
        return cached

    def _renew(self) -> None:
        """A new read (the caller holds ``_lock``). The time is set after the read: a scrape
        that sees the new read with the old time only takes the lock once more."""
        self._cached = self._read()
        self._read_at = time.monotonic()

    def _keep_fresh(self) -> None:
        with self._thread_lock:
            if self._refresher is None and not self._closed.is_set():
                self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                                   name="metrics-refresh")
                self._refresher.start()

    def _refresh(self) -> None:
        """Renew the read every ``ttl_s`` until scrapes stop coming (or :meth:`close`)."""
        while not self._closed.wait(self.ttl_s):
            if time.monotonic() - self._scraped_at > IDLE_S:
                break
            with self._lock:
                if time.monotonic() - self._read_at >= self.ttl_s:
                    self._renew()
        with self._thread_lock:
            self._refresher = None

    def close(self) -> None:
        """Stop reading in the background (before the store is closed)."""
        self._closed.set()
        with self._thread_lock:
            thread = self._refresher
        if thread is not None:
            thread.join(timeout=30)

    def _read(self) -> Snapshot:
        started = time.perf_counter()
        store, config, now = self.store(), self.config(), self.clock()
        overdue = now - timedelta(seconds=3 * config.sweep_interval_s)
        apps = [a.appid for a in config.apps]
        try:
            snap = Snapshot(
                grants=store.grant_counts(), reauth=store.reauth_counts(),
                due=store.due_counts(apps, now, overdue),
                last_sweep=store.last_sweep_finished_at(),
                quota=[(q.appid, q.endpoint, q.used, q.limit)
                       for q in quota_use(store, config, now)],
                events=store.delivery_counts(),
            )
        except StoreError as e:
            if not self._said_failure:  # once per outage; the gauge says the rest
                log.warning("metrics.database_unavailable", error=str(e))
                self._said_failure = True
            return Snapshot(ok=False, seconds=time.perf_counter() - started)
        self._said_failure = False
        snap.seconds = time.perf_counter() - started
        return snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        up = GaugeMetricFamily("keeper_database_up",
                               "1 when the last read of the database for these metrics worked.")
        up.add_metric([], 1 if snap.ok else 0)
        yield up
        took = GaugeMetricFamily("keeper_database_read_seconds",
                                 "How long the last read of the database for these metrics took.")
        took.add_metric([], snap.seconds)
        yield took
        interval = GaugeMetricFamily("keeper_sweep_interval_seconds",
                                     "The configured sweep_interval (for alerts on late sweeps).")
        interval.add_metric([], self.config().sweep_interval_s)
        yield interval
        if not snap.ok:
            return
        apps = [a.appid for a in self.config().apps]
        yield _family("keeper_grants", "Grants by app and state (active, expiring, reauth).",
                      ["app", "state"], snap.grants, [(a, s) for a in apps for s in STATES])
        yield _family("keeper_reauth_records", "Users who must re-authorize (or whose refresh "
                      "token WeChat declined to renew), by app and reason.", ["app", "reason"],
                      snap.reauth, [(a, r) for a in apps for r in REASONS])
        due = GaugeMetricFamily("keeper_work_due", "Grants whose work (refresh, access, "
                                "profile) is due now, by app.", labels=["app", "kind"])
        overdue = GaugeMetricFamily(
            "keeper_work_overdue", "Grants whose work has been due for more than three sweep "
            "intervals, by app.", labels=["app", "kind"])
        for (app, kind), (now_n, old_n) in sorted(snap.due.items()):
            due.add_metric([app, kind], now_n)
            overdue.add_metric([app, kind], old_n)
        yield due
        yield overdue
        if snap.last_sweep is not None:
            last = GaugeMetricFamily(
                "keeper_last_sweep_finished_timestamp_seconds",
                "When the latest finished sweep of any keeper process ended (Unix seconds).")
            last.add_metric([], snap.last_sweep.timestamp())
            yield last
        used = GaugeMetricFamily("keeper_quota_window_permits", "Quota permits taken by all "
                                 "processes in the current quota window.",
                                 labels=["app", "endpoint"])
        limit = GaugeMetricFamily("keeper_quota_limit_permits", "The quota: permits allowed "
                                  "per quota window.", labels=["app", "endpoint"])
        for app, endpoint, n, most in snap.quota:
            used.add_metric([app, endpoint], n)
            limit.add_metric([app, endpoint], most)
        yield used
        yield limit
        for key, doc in (("pending", "Event deliveries to webhooks waiting (first attempt or "
                                     "a retry), as keeper status counts events_pending."),
                         ("failed", "Event deliveries given up after retrying for the retry "
                                    "period (keeper events --failed; replay them).")):
            family = GaugeMetricFamily(f"keeper_events_{key}", doc)
            family.add_metric([], snap.events.get(f"events_{key}", 0))
            yield family


def _family(name: str, doc: str, labels: list[str], counts: dict[tuple[str, str], int],
            zeros: list[tuple[str, str]]) -> GaugeMetricFamily:
    """A gauge of ``counts``, with a 0 for each of ``zeros`` not in it (so an alert on a
    configured app's series has a series to look at)."""
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key in sorted(set(counts) | set(zeros)):
        family.add_metric(list(key), counts.get(key, 0))
    return family
