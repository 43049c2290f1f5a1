"""One sweep's run (:class:`SweepRun`): claim pages of due grants, feed the workers, hand their
results to the :class:`~keeper.sweep.engine.Sweeper` and write them in batches, stop on a flag,
when WeChat stops answering or when the database fails; then the canonical summary line."""

from __future__ import annotations

import os
import queue
import socket
import time
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from keeper.core.models import Grant
from keeper.errors import DatabaseUnavailable, StoreError
from keeper.metrics import process as metrics
from keeper.store.rows import new_lease_id
from keeper.sweep.worker import Result

if TYPE_CHECKING:
    from keeper.sweep.engine import Sweeper


# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.sweep")

SUMMARY_KEYS = (
    "refresh_tokens_refreshed", "access_tokens_refreshed", "reauth_recorded",
    "profiles_fetched", "avatars_saved", "transient_failures",
)
_SUCCESSES = ("refresh_tokens_refreshed", "access_tokens_refreshed", "profiles_fetched",
              "no_profile", "reauth_recorded")
#: Held results are committed this often at least: what a SIGKILL can take is the calls in
#: flight plus this long of answers.
FLUSH_EVERY_S = 0.05
#: The fewest grants a sweep keeps claimed ahead (two pages of ``workers`` above 16 workers).
MIN_PAGE = 32
FLUSH_BATCH = 200
#: After a stop (or a database failure), how long calls in flight may take to come back.
STOP_GRACE_S = 6.0
PROGRESS_EVERY_S = 30.0
#: Transient failures in a row, with no answer from WeChat between them, that end a sweep.
UNAVAILABLE_STREAK = 20


class SweepRun:
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
        self.results: queue.Queue[Result] = queue.Queue()
        self.in_flight: dict[int, Grant] = {}
        self.exhausted = False
        self.streak = 0  # transient failures in a row
        self.unavailable = False
        self.stop_seen: float | None = None
        self.db_error: str | None = None  # the database failed: stop claiming, keep results
        self.bugs: set[tuple[str, int | None]] = set()  # (endpoint, errcode) logged
        self.unsettled = 0  # results taken since the last write

    def claim(self) -> None:
        # Keep up to two workers' worth (at least MIN_PAGE) queued or in flight, so workers
        # never wait for a claim, and claim when a quarter of that is free: few workers still
        # claim in pages big enough that a claim's transaction is not paid per grant.
        page = max(MIN_PAGE, 2 * self.config.workers)
        if page - len(self.in_flight) < page // 4:
            return
        now = self.s.clock()
        with self.s._held_lock:
            exclude = set(self.s.held)
        batch = self.s.store.claim(
            appids=sorted(self.apps - self.rejected - self.deferred), cutoff=self.cutoff,
            limit=page - len(self.in_flight), lease_id=self.lease_id, now=now,
            lease_s=self.config.lease_s, exclude=exclude,
        )
        self.exhausted = not batch
        for g in batch:
            self.in_flight[g.id] = g
            self.s._tasks.put((g, self.lease_id, self.results))

    def take(self, r: Result) -> None:
        self.in_flight.pop(r.grant.id, None)
        self.counts.update(r.counts)
        appid = r.grant.appid
        if r.rejected_app is not None and appid not in self.rejected:
            self.rejected.add(appid)
            rejected = r.rejected_app
            if self.s.rejected_apps.get(appid) != rejected.errcode:
                # One line when WeChat starts refusing the app (or refuses it anew), not one
                # per user or per sweep; the app is skipped for the rest of each sweep.
                self.s.rejected_apps[appid] = rejected.errcode
                log.error("wechat.app_rejected", appid=appid, errcode=rejected.errcode,
                          endpoint=rejected.endpoint, detail=rejected.detail)
        elif r.rejected_app is None and r.write is not None and appid in self.s.rejected_apps \
                and any(r.counts[k] for k in _SUCCESSES):
            log.info("wechat.app_accepted", appid=appid,
                     after_errcode=self.s.rejected_apps.pop(appid))
        if r.bug is not None and (r.bug.endpoint, r.bug.errcode) not in self.bugs:
            # A keeper bug: once per endpoint and code in a sweep.
            self.bugs.add((r.bug.endpoint, r.bug.errcode))
            log.error("wechat.keeper_bug", appid=appid, endpoint=r.bug.endpoint,
                      errcode=r.bug.errcode, detail=r.bug.detail)
        if r.quota_wait is not None and appid not in self.deferred:
            self.deferred.add(appid)
            log.warning("quota.deferred", appid=appid, endpoint=r.quota_wait.endpoint,
                        until=r.quota_wait.until.isoformat())
        if r.write is not None:
            self.counts["grants_worked"] += 1
        else:
            self.s.release_later(self.lease_id, [r.grant.id])
        self.unsettled += 1
        if r.db_error is not None:
            self.database_failed(r.db_error)
        self.watch_wechat(r)

    def watch_wechat(self, r: Result) -> None:
        """End the sweep's calls when WeChat has stopped answering: a streak of calls with no
        answer (network, timeout, 5xx, HTML, -1). One user's odd errcode is an answer."""
        if any(r.counts[k] for k in _SUCCESSES) or r.rejected_app or r.quota_wait:
            self.streak = 0
        elif r.counts["unanswered"]:
            self.streak += 1
        if self.streak >= UNAVAILABLE_STREAK and not self.unavailable:
            self.unavailable = True
            self.s.worker.halt.set()  # queued grants go back untouched
            log.warning("wechat.unavailable", streak=self.streak, last_error=(
                r.write.grant.last_error if r.write else None))

    def database_failed(self, error: str) -> None:
        """Stop claiming and writing; calls in flight come back and their results are held."""
        if self.db_error is None:
            self.db_error = error
            self.s.worker.halt.set()
            self.unqueue()

    def unqueue(self) -> None:
        """Take back the grants still queued (not started): their leases are given back."""
        while True:
            try:
                task = self.s._tasks.get_nowait()
            except queue.Empty:
                return
            if task is None:  # close() asked a thread to end: leave that to a thread
                self.s._tasks.put(None)
                return
            grant, lease_id, _ = task
            self.in_flight.pop(grant.id, None)
            self.s.release_later(lease_id, [grant.id])

    def flush(self) -> None:
        if self.db_error is not None:
            return
        try:
            _, superseded = self.s.write_held()
        except StoreError as e:
            self.database_failed(str(e))
            return
        self.counts["leases_lost"] += superseded
        metrics.leases_lost(superseded)
        self.unsettled = 0

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
        # First what an earlier exit journaled and what an earlier sweep could not write:
        # nothing is claimed before they are committed (a failure here ends the sweep).
        self.s.replay_journal()
        caught_up, _ = self.s.write_held()
        if caught_up:
            log.info("results.caught_up", written=caught_up)
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
            ending = self.stop_seen is not None or self.db_error is not None
            if not ending and not self.exhausted and not self.unavailable:
                try:
                    self.claim()
                except StoreError as e:
                    self.database_failed(str(e))
                    ending = True
            if ending and self.stop_seen is None:
                self.stop_seen = now_m  # the grace for calls in flight starts now
            done = self.exhausted or self.unavailable or ending
            if not self.in_flight and done:
                break
            if self.stop_seen is not None and now_m - self.stop_seen > STOP_GRACE_S:
                self.abandon()
                break
            if self.in_flight:
                self.drain(0.05)
            if (self.unsettled >= FLUSH_BATCH or not self.in_flight
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
        if self.db_error is not None:
            raise DatabaseUnavailable(self.db_error)
        if self.s.avatars is not None and self.stop_seen is None:
            # After the grants, holding no lease: avatar hosts cannot stall refreshes.
            self.counts.update(self.s.avatars.run(
                self.s.stop, budget_s=max(30.0, self.config.sweep_interval_s)))
        summary = self.summary(started)
        self.s.store.finish_sweep(sweep_id, self.s.clock(), summary)
        log.info("sweep.finished", sweep_id=sweep_id, **summary)
        metrics.sweep_finished(summary)
        return summary

    def abandon(self) -> None:
        """The grace is over: give back the grants whose calls have not come back.

        Should their results still arrive, the worker threads hold them in the sweeper.
        """
        self.counts["abandoned"] += len(self.in_flight)
        log.warning("sweep.abandoned", in_flight=len(self.in_flight))
        self.s.release_later(self.lease_id, list(self.in_flight))
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
