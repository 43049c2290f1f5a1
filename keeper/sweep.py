"""One sweep: claim what is due, work it with ``workers`` calls in flight, write the results.

The sweep's own thread claims grants in small pages (never the whole table), hands them to a
pool of daemon worker threads, and writes results in batches, so one database writer per
process does all the writing. It checks the stop flag between pages; workers check it between
WeChat calls. When WeChat stops answering (a streak of transient failures with no success),
the sweep stops calling it and ends early; the next sweep probes again.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from keeper.avatar_pass import AvatarKeeper
from keeper.config import Config
from keeper.models import Grant
from keeper.store import GrantWrite, Store, new_lease_id
from keeper.worker import Result, Worker

log = structlog.get_logger(__name__)

SUMMARY_KEYS = (
    "refresh_tokens_refreshed", "access_tokens_refreshed", "reauth_recorded",
    "profiles_fetched", "avatars_saved", "transient_failures",
)
_SUCCESSES = ("refresh_tokens_refreshed", "access_tokens_refreshed", "profiles_fetched",
              "no_profile", "reauth_recorded")
FLUSH_EVERY_S = 0.25
FLUSH_BATCH = 200
STOP_GRACE_S = 8.0
PROGRESS_EVERY_S = 30.0
#: Transient failures in a row, with no answer from WeChat between them, that end a sweep.
UNAVAILABLE_STREAK = 20


def utcnow() -> datetime:
    return datetime.now(UTC)


_Task = tuple[Grant, "queue.Queue[Result]"]


class Sweeper:
    """Runs sweeps for one process. ``stop`` ends a sweep early and cleanly."""

    def __init__(
        self, *, config: Config, store: Store, worker: Worker, stop: threading.Event,
        clock: Callable[[], datetime] = utcnow,
        progress: Callable[[int, int], None] | None = None,
        avatars: AvatarKeeper | None = None,
    ) -> None:
        self.config = config
        self.avatars = avatars
        self.store = store
        self.worker = worker
        self.stop = stop
        self.clock = clock
        self.progress = progress
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # one sweep at a time in this process
        #: Monotonic time of the sweep loop's last turn (None: no sweep running). The service's
        #: watchdog stops pinging systemd when a running sweep stops turning.
        self.busy_since: float | None = None
        self.last_turn: float = time.monotonic()

    def _start_threads(self) -> None:
        while len(self._threads) < self.config.workers:
            t = threading.Thread(target=self._loop, name=f"keeper-worker-{len(self._threads)}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _loop(self) -> None:
        while (task := self._tasks.get()) is not None:
            grant, results = task
            try:
                result = self.worker.work(grant)
            except Exception:  # a bug must not lose the lease's bookkeeping
                log.exception("worker.failed", appid=grant.appid, openid=grant.openid)
                result = Result(grant)
                result.counts["worker_errors"] += 1
            results.put(result)

    def close(self) -> None:
        """End the worker threads (they are daemons; this is for tidy tests)."""
        for _ in self._threads:
            self._tasks.put(None)
        self._threads.clear()

    def run_once(self, now: datetime | None = None) -> dict[str, Any]:
        """One sweep over everything due at ``now``; returns its summary.

        Raises :class:`keeper.errors.StoreError` when the database fails; the caller logs it.
        """
        with self._lock:
            self.busy_since = self.last_turn = time.monotonic()
            try:
                return _Run(self, now or self.clock()).run()
            finally:
                self.busy_since = None


class _Run:
    """The state of one sweep."""

    def __init__(self, sweeper: Sweeper, cutoff: datetime) -> None:
        self.s = sweeper
        self.cutoff = cutoff
        self.config = sweeper.config
        self.counts: Counter[str] = Counter()
        self.lease_id = new_lease_id()
        self.apps = {a.appid for a in self.config.apps}
        self.rejected: set[str] = set()  # WeChat refused the app itself: an operator's problem
        self.deferred: set[str] = set()  # the app's quota is used up for longer than we wait
        self.writes: list[GrantWrite] = []
        self.releases: list[int] = []
        self.results: queue.Queue[Result] = queue.Queue()
        self.in_flight: dict[int, Grant] = {}
        self.exhausted = False
        self.streak = 0  # transient failures in a row
        self.unavailable = False
        self.stop_seen: float | None = None

    def claim(self) -> None:
        page = 2 * self.config.workers
        # Keep up to two pages queued or in flight, so workers never wait for a claim.
        if page - len(self.in_flight) < max(1, self.config.workers // 2):
            return
        now = self.s.clock()
        batch = self.s.store.claim(
            appids=sorted(self.apps - self.rejected - self.deferred), cutoff=self.cutoff,
            limit=page - len(self.in_flight), lease_id=self.lease_id, now=now,
            lease_until=now + timedelta(seconds=self.config.lease_s),
        )
        self.exhausted = not batch
        for g in batch:
            self.in_flight[g.id] = g
            self.s._tasks.put((g, self.results))

    def take(self, r: Result) -> None:
        self.in_flight.pop(r.grant.id, None)
        self.counts.update(r.counts)
        appid = r.grant.appid
        if r.rejected_app is not None and appid not in self.rejected:
            # One line per app and sweep, not one per user.
            self.rejected.add(appid)
            log.error("wechat.app_rejected", appid=appid, errcode=r.rejected_app.errcode,
                      endpoint=r.rejected_app.endpoint, detail=r.rejected_app.detail)
        if r.quota_wait is not None and appid not in self.deferred:
            self.deferred.add(appid)
            log.warning("quota.deferred", appid=appid, endpoint=r.quota_wait.endpoint,
                        until=r.quota_wait.until.isoformat())
        if r.write is not None:
            self.writes.append(r.write)
            self.counts["grants_worked"] += 1
        else:
            self.releases.append(r.grant.id)
        self.watch_wechat(r)

    def watch_wechat(self, r: Result) -> None:
        """End the sweep's calls when WeChat has stopped answering."""
        if any(r.counts[k] for k in _SUCCESSES) or r.rejected_app or r.quota_wait:
            self.streak = 0
        elif r.counts["transient_failures"]:
            self.streak += 1
        if self.streak >= UNAVAILABLE_STREAK and not self.unavailable:
            self.unavailable = True
            self.s.worker.halt.set()  # queued grants go back untouched
            log.warning("wechat.unavailable", streak=self.streak, last_error=(
                r.write.grant.last_error if r.write else None))

    def flush(self) -> None:
        if self.writes:
            written = self.s.store.apply(self.writes, self.lease_id, self.s.clock())
            self.counts["leases_lost"] += len(self.writes) - written
            self.writes = []
        if self.releases:
            self.s.store.release(self.releases, self.lease_id)
            self.releases = []

    def drain(self, timeout_s: float) -> None:
        """Take the results that are ready, waiting up to ``timeout_s`` for the first."""
        try:
            self.take(self.results.get(timeout=timeout_s))
            while True:
                self.take(self.results.get_nowait())
        except queue.Empty:
            pass

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        sweep_id = self.s.store.start_sweep(self.cutoff, host=socket.gethostname(),
                                            pid=os.getpid())
        log.info("sweep.started", sweep_id=sweep_id, cutoff=self.cutoff.isoformat())
        self.s.worker.halt.clear()
        self.s._start_threads()
        last_flush = last_progress = time.monotonic()
        while True:
            now_m = self.s.last_turn = time.monotonic()
            if self.s.stop.is_set() and self.stop_seen is None:
                self.stop_seen = now_m
                log.info("sweep.stopping", in_flight=len(self.in_flight))
            if self.stop_seen is None and not self.exhausted and not self.unavailable:
                self.claim()
            done = self.exhausted or self.unavailable or self.stop_seen is not None
            if not self.in_flight and done:
                break
            if self.stop_seen is not None and now_m - self.stop_seen > STOP_GRACE_S:
                self.abandon()
                break
            if self.in_flight:
                self.drain(0.05)
            if (len(self.writes) + len(self.releases) >= FLUSH_BATCH or not self.in_flight
                    or now_m - last_flush >= FLUSH_EVERY_S):
                self.flush()
                last_flush = now_m
            if self.s.progress is not None:
                self.s.progress(self.counts["grants_worked"], len(self.in_flight))
            if now_m - last_progress >= PROGRESS_EVERY_S:
                last_progress = now_m
                log.info("sweep.progress", sweep_id=sweep_id, in_flight=len(self.in_flight),
                         **{k: self.counts[k] for k in SUMMARY_KEYS})
        self.flush()
        if self.s.avatars is not None and self.stop_seen is None:
            # After the grants, holding no lease: avatar hosts cannot stall refreshes.
            self.counts.update(self.s.avatars.run(
                self.s.stop, budget_s=max(30.0, self.config.sweep_interval_s)))
        summary = self.summary(started)
        self.s.store.finish_sweep(sweep_id, self.s.clock(), summary)
        log.info("sweep.finished", sweep_id=sweep_id, **summary)
        return summary

    def abandon(self) -> None:
        """Shutdown grace is over: give back the grants whose calls have not come back.

        Their results, should they still arrive, go to this sweep's queue and nowhere else.
        """
        self.counts["abandoned"] += len(self.in_flight)
        log.warning("sweep.abandoned", in_flight=len(self.in_flight))
        self.releases.extend(self.in_flight)
        self.in_flight.clear()

    def summary(self, started: float) -> dict[str, Any]:
        summary: dict[str, Any] = {k: self.counts[k] for k in SUMMARY_KEYS}
        summary.update({k: v for k, v in self.counts.items() if k not in summary})
        summary["seconds"] = round(time.monotonic() - started, 3)
        summary["stopped"] = self.stop_seen is not None
        summary["wechat_unavailable"] = self.unavailable
        summary["apps_rejected"] = sorted(self.rejected)
        summary["apps_deferred"] = sorted(self.deferred)
        return summary
