"""One sweep: claim what is due, work it with ``workers`` calls in flight, write the results.

The sweep's own thread claims grants in small pages (never the whole table), hands them to a
pool of daemon worker threads, and writes results in batches, so one database writer per
process does all the writing. It checks the stop flag between pages; workers check it between
WeChat calls.
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

from keeper.config import Config
from keeper.errors import StoreError
from keeper.models import Grant
from keeper.store import GrantWrite, Store, new_lease_id
from keeper.worker import Result, Worker

log = structlog.get_logger(__name__)

SUMMARY_KEYS = (
    "refresh_tokens_refreshed", "access_tokens_refreshed", "reauth_recorded",
    "profiles_fetched", "avatars_saved", "transient_failures",
)
FLUSH_EVERY_S = 0.25
FLUSH_BATCH = 200
STOP_GRACE_S = 8.0
PROGRESS_EVERY_S = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class Sweeper:
    """Runs sweeps for one process. ``stop`` ends a sweep early and cleanly."""

    def __init__(
        self, *, config: Config, store: Store, worker: Worker, stop: threading.Event,
        clock: Callable[[], datetime] = utcnow,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.worker = worker
        self.stop = stop
        self.clock = clock
        self.progress = progress
        self._tasks: queue.Queue[Grant | None] = queue.Queue()
        self._results: queue.Queue[Result] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # one sweep at a time in this process

    def _start_threads(self) -> None:
        while len(self._threads) < self.config.workers:
            t = threading.Thread(target=self._loop, name=f"keeper-worker-{len(self._threads)}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _loop(self) -> None:
        while (grant := self._tasks.get()) is not None:
            try:
                result = self.worker.work(grant)
            except Exception:  # a bug must not lose the lease's bookkeeping
                log.exception("worker.failed", appid=grant.appid, openid=grant.openid)
                result = Result(grant)
                result.counts["worker_errors"] += 1
            self._results.put(result)

    def close(self) -> None:
        """End the worker threads (they are daemons; this is for tidy tests)."""
        for _ in self._threads:
            self._tasks.put(None)
        self._threads.clear()

    def _drain(self, timeout_s: float) -> list[Result]:
        """Results that are ready, waiting up to ``timeout_s`` for the first."""
        out: list[Result] = []
        try:
            out.append(self._results.get(timeout=timeout_s))
            while True:
                out.append(self._results.get_nowait())
        except queue.Empty:
            pass
        return out

    @staticmethod
    def _take(
        r: Result, counts: Counter[str], rejected: set[str], deferred: set[str],
        writes: list[GrantWrite], releases: list[Grant],
    ) -> None:
        counts.update(r.counts)
        appid = r.grant.appid
        if r.rejected_app is not None and appid not in rejected:
            # One line per app and sweep, not one per user.
            rejected.add(appid)
            log.error("wechat.app_rejected", appid=appid, errcode=r.rejected_app.errcode,
                      endpoint=r.rejected_app.endpoint, detail=r.rejected_app.detail)
        if r.quota_wait is not None and appid not in deferred:
            deferred.add(appid)
            log.warning("quota.deferred", appid=appid, endpoint=r.quota_wait.endpoint,
                        until=r.quota_wait.until.isoformat())
        if r.write is not None:
            writes.append(r.write)
            counts["grants_worked"] += 1
        else:
            releases.append(r.grant)

    def run_once(self, now: datetime | None = None) -> dict[str, Any]:
        """One sweep over everything due at ``now``; returns its summary."""
        with self._lock:
            return self._sweep(now or self.clock())

    def _sweep(self, cutoff: datetime) -> dict[str, Any]:
        started = time.monotonic()
        sweep_id = self.store.start_sweep(cutoff, host=socket.gethostname(), pid=os.getpid())
        log.info("sweep.started", sweep_id=sweep_id, cutoff=cutoff.isoformat())
        self._start_threads()
        counts: Counter[str] = Counter()
        lease_id = new_lease_id()
        apps = {a.appid for a in self.config.apps}
        rejected: set[str] = set()  # WeChat refused the app itself: an operator's problem
        deferred: set[str] = set()  # the app's quota is used up for longer than a lease
        writes: list[GrantWrite] = []
        releases: list[Grant] = []
        in_flight = 0
        exhausted = False
        last_flush = last_progress = time.monotonic()
        stop_seen: float | None = None
        page = 2 * self.config.workers
        refill = max(1, self.config.workers // 2)

        def flush() -> None:
            nonlocal writes, releases
            if writes:
                written = self.store.apply(writes, lease_id, self.clock())
                counts["leases_lost"] += len(writes) - written
                writes = []
            if releases:
                self.store.release([g.id for g in releases], lease_id)
                releases = []

        error: StoreError | None = None
        try:
            while True:
                if self.stop.is_set() and stop_seen is None:
                    stop_seen = time.monotonic()
                    log.info("sweep.stopping", in_flight=in_flight)
                # Keep up to two pages' worth queued, so workers never wait for a claim.
                if stop_seen is None and not exhausted and page - in_flight >= refill:
                    batch = self.store.claim(
                        appids=sorted(apps - rejected - deferred), cutoff=cutoff,
                        limit=page - in_flight, lease_id=lease_id, now=self.clock(),
                        lease_until=self.clock() + timedelta(seconds=self.config.lease_s),
                    )
                    exhausted = not batch
                    for g in batch:
                        self._tasks.put(g)
                    in_flight += len(batch)
                if in_flight == 0 and (exhausted or stop_seen is not None):
                    break
                if stop_seen is not None and time.monotonic() - stop_seen > STOP_GRACE_S:
                    # Calls still in flight keep their leases, which lapse by themselves.
                    counts["abandoned"] += in_flight
                    log.warning("sweep.abandoned", in_flight=in_flight)
                    break
                for r in self._drain(0.05) if in_flight else []:
                    in_flight -= 1
                    self._take(r, counts, rejected, deferred, writes, releases)
                now_m = time.monotonic()
                if (len(writes) + len(releases) >= FLUSH_BATCH or in_flight == 0
                        or now_m - last_flush >= FLUSH_EVERY_S):
                    flush()
                    last_flush = now_m
                if self.progress is not None:
                    self.progress(counts["grants_worked"], in_flight)
                if now_m - last_progress >= PROGRESS_EVERY_S:
                    last_progress = now_m
                    log.info("sweep.progress", sweep_id=sweep_id, in_flight=in_flight,
                             **{k: counts[k] for k in SUMMARY_KEYS})
            flush()
        except StoreError as e:
            error = e
        summary: dict[str, Any] = {k: counts[k] for k in SUMMARY_KEYS}
        summary.update({
            k: v for k, v in counts.items() if k not in summary
        })
        summary["seconds"] = round(time.monotonic() - started, 3)
        summary["stopped"] = stop_seen is not None
        summary["apps_rejected"] = sorted(rejected)
        summary["apps_deferred"] = sorted(deferred)
        if error is not None:
            raise error  # logged once, by whoever runs the sweep
        self.store.finish_sweep(sweep_id, self.clock(), summary)
        log.info("sweep.finished", sweep_id=sweep_id, **summary)
        return summary
