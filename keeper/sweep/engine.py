"""The sweep engine: claim what is due, work it with ``workers`` calls in flight, write the results.

A sweep runs on the process's event loop (:mod:`keeper.loop`): it claims grants in small pages
(never the whole table), works each as a task (:meth:`Worker.work_async`, at most ``workers``
under way), and writes results in batches. The database work (claims, writes, the journal)
runs in one thread of the sweeper's, its writer, so one database writer per process does all
the writing and the loop never waits on the database. The sweep checks the stop flag between
pages; workers check it between WeChat calls. When WeChat stops answering (a streak of
transient failures with no success), the sweep stops calling it and ends early; the next sweep
probes again.

Nothing WeChat answered is lost to the database: a worker hands its result to the
:class:`Sweeper` (not to one sweep), which holds it until it is committed. When the database
fails, the sweep stops claiming, lets the calls in flight come back, and ends with
:class:`DatabaseUnavailable`; the held results are written first thing in the next sweep
(their grants are not claimed again meanwhile), and if the process must exit before that,
they go to the local journal (:mod:`keeper.sweep.journal`), which the next start replays.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import structlog

from keeper.avatars.sweep_pass import AvatarKeeper
from keeper.clock import utcnow
from keeper.config import Config
from keeper.core.models import Grant
from keeper.errors import DatabaseUnavailable, StoreError
from keeper.metrics import process as metrics
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite, new_lease_id
from keeper.sweep.journal import Journal
from keeper.sweep.worker import Result, Worker

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.sweep")

SUMMARY_KEYS = (
    "refresh_tokens_refreshed", "access_tokens_refreshed", "reauth_recorded",
    "profiles_fetched", "avatars_saved", "transient_failures",
)
_SUCCESSES = ("refresh_tokens_refreshed", "access_tokens_refreshed", "profiles_fetched",
              "no_profile", "reauth_recorded", "reauth_held")
#: Held results are committed this often at least: what a SIGKILL can take is the calls in
#: flight plus this long of answers.
FLUSH_EVERY_S = 0.05
#: The fewest grants a sweep keeps claimed ahead (three ``workers``' worth above 10 workers).
MIN_PAGE = 32
FLUSH_BATCH = 200
#: After a stop (or a database failure), how long calls in flight may take to come back.
STOP_GRACE_S = 6.0
PROGRESS_EVERY_S = 30.0
#: Transient failures in a row, with no answer from WeChat between them, that end a sweep.
UNAVAILABLE_STREAK = 20

#: Results written per transaction when held results are caught up after an outage.
CATCH_UP_BATCH = 500

T = TypeVar("T")


@dataclass(frozen=True)
class Held:
    """A result not yet committed, and the lease it was worked under."""

    write: GrantWrite
    lease_id: str


class Sweeper:
    """Runs sweeps for one process. ``stop`` ends a sweep early and cleanly.

    Holds every result a worker produced until it is committed (:attr:`held`), across sweeps.
    """

    def __init__(
        self, *, config: Config, store: Store, worker: Worker, stop: threading.Event,
        clock: Callable[[], datetime] = utcnow,
        progress: Callable[[int, int], None] | None = None,
        avatars: AvatarKeeper | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.config = config
        self.avatars = avatars
        self.store = store
        self.worker = worker
        self.stop = stop
        self.clock = clock
        self.progress = progress
        self.journal = journal
        self.loop = worker.loop
        #: The writer: the sweep's database work, one statement at a time, off the loop.
        self._db: ThreadPoolExecutor | None = None
        #: The calls under way (tasks on the loop), a sweep's or one it abandoned.
        self._calls: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()  # one sweep at a time in this process
        self._held_lock = threading.Lock()
        #: Results not yet committed, by grant id (written by the calls' tasks).
        self.held: dict[int, Held] = {}
        #: Leases to give back (grants that were claimed and not worked), by lease id.
        self._releases: dict[str, set[int]] = {}
        self._working = 0  # tasks inside Worker.work_async (written on the loop only)
        self._journal_replayed = journal is None
        #: Apps WeChat refuses (appid → errcode), logged once until WeChat accepts them again.
        self.rejected_apps: dict[str, int | None] = {}
        #: Set while no sweep runs in this process.
        self.idle = threading.Event()
        self.idle.set()
        #: Monotonic time of the sweep loop's last turn (None: no sweep running). The service's
        #: watchdog stops pinging systemd when a running sweep stops turning.
        self.busy_since: float | None = None
        self.last_turn: float = time.monotonic()
        #: Called after results were committed (they may have recorded events): the service
        #: wakes its event delivery with it.
        self.on_written: Callable[[], None] | None = None

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the writer thread; the loop goes on meanwhile."""
        if self._db is None:
            self._db = ThreadPoolExecutor(1, thread_name_prefix="keeper-sweep-db")
        return await asyncio.get_running_loop().run_in_executor(
            self._db, functools.partial(fn, *args, **kwargs))

    def start_call(self, grant: Grant, run: SweepRun) -> None:
        """Work ``grant`` as a task (on the loop), for ``run``."""
        task = asyncio.get_running_loop().create_task(self._call(grant, run))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, grant: Grant, run: SweepRun) -> None:
        self._working += 1
        try:
            result = await self.worker.work_async(grant)  # never raises: keeps the answers
        finally:
            self._working -= 1
        if result.write is not None:
            # Held by the process, not by the sweep that asked: a sweep that ended
            # (database down, shutdown) cannot drop it.
            with self._held_lock:
                self.held[grant.id] = Held(result.write, run.lease_id)
        run.returned(result)

    def release_later(self, lease_id: str, grant_ids: Any) -> None:
        with self._held_lock:
            self._releases.setdefault(lease_id, set()).update(grant_ids)

    def write_held(self) -> tuple[int, int]:
        """Commit held results and give back unused leases; (written, superseded).

        Raises StoreError when the database fails: what was not committed stays held. A
        result the database refuses on its own (bad data) is retried alone, then without its
        profile, then dropped with one ``result.unwritable`` line: it never blocks others.
        """
        with self._held_lock:
            items = list(self.held.values())
            releases = {k: set(v) for k, v in self._releases.items()}
        written = superseded = 0
        by_lease: dict[str, list[Held]] = {}
        for h in items:
            by_lease.setdefault(h.lease_id, []).append(h)
        now = self.clock()
        for lease_id, group in by_lease.items():
            for i in range(0, len(group), CATCH_UP_BATCH):
                chunk = group[i:i + CATCH_UP_BATCH]
                done = self._apply(lease_id, chunk, now)
                written += done
                superseded += len(chunk) - done
                with self._held_lock:
                    for h in chunk:
                        if self.held.get(h.write.grant.id) is h:
                            del self.held[h.write.grant.id]
        for lease_id, ids in releases.items():
            self.store.release(sorted(ids), lease_id)
            with self._held_lock:
                left = self._releases.get(lease_id, set()) - ids
                if left:
                    self._releases[lease_id] = left
                else:
                    self._releases.pop(lease_id, None)
        if superseded:
            log.info("results.superseded", count=superseded)
        if written and self.on_written is not None:
            self.on_written()
        return written, superseded

    def _apply(self, lease_id: str, chunk: list[Held], now: datetime) -> int:
        writes = [h.write for h in chunk]
        try:
            return self.store.apply(writes, lease_id, now)
        except DatabaseUnavailable:
            raise
        except StoreError as e:
            if len(writes) == 1:
                return self._apply_alone(lease_id, writes[0], now, str(e))
        # One result the database refuses must not cost the others theirs.
        return sum(self._apply(lease_id, [h], now) for h in chunk)

    def _apply_alone(self, lease_id: str, write: GrantWrite, now: datetime, error: str) -> int:
        """The database refused this one result as it is (``error``): keep its tokens
        without the profile (read again later), or drop it with one line."""
        g = write.grant
        if write.profile is not None:
            try:
                return self.store.apply([replace(write, profile=None)], lease_id, now)
            except DatabaseUnavailable:
                raise
            except StoreError as e:
                error = str(e)
        log.error("result.unwritable", appid=g.appid, openid=g.openid, error=error)
        return 0

    def held_count(self) -> int:
        with self._held_lock:
            return len(self.held)

    def working(self) -> int:
        with self._held_lock:
            return self._working

    def replay_journal(self) -> None:
        """Once per process, before the first claim: write what an earlier exit journaled."""
        if self._journal_replayed or self.journal is None:
            return
        counts = self.journal.replay(self.store, self.clock())
        self._journal_replayed = True
        if counts["files"] or counts["unreadable"]:
            log.info("journal.replayed", **counts)

    def save_held(self) -> int:
        """Write held results to the journal (at exit, when the database cannot take them).

        Returns how many were kept; logs ``journal.saved``, or ``journal.failed`` with the
        count lost when the disk refuses.
        """
        with self._held_lock:
            items = list(self.held.values())
            self.held.clear()
        if not items:
            return 0
        if self.journal is None:
            log.error("journal.failed", lost=len(items), error="no journal configured")
            return 0
        try:
            path = self.journal.write([(h.write, h.lease_id) for h in items])
        except OSError as e:
            log.error("journal.failed", lost=len(items), error=f"{type(e).__name__}: "
                      f"{e.strerror or e}", directory=str(self.journal.directory))
            return 0
        log.warning("journal.saved", results=len(items), file=str(path))
        return len(items)

    def adopt(self, other: Sweeper) -> None:
        """Take over the held results and leases of a sweeper being replaced (a reload)."""
        with other._held_lock:
            held, releases = dict(other.held), other._releases
            other.held.clear()
            other._releases = {}
        with self._held_lock:
            self.held.update(held)
            for k, v in releases.items():
                self._releases.setdefault(k, set()).update(v)
        self._journal_replayed = self._journal_replayed or other._journal_replayed
        self.rejected_apps.update(other.rejected_apps)

    def close(self) -> None:
        """Cancel the calls still under way (an abandoned sweep's) and end the writer thread.
        What they would have answered is lost with them: called at shutdown, after
        :meth:`save_held`, or on a reload, between sweeps."""
        if self._calls and self.loop.running:
            calls = list(self._calls)
            self.loop.loop.call_soon_threadsafe(lambda: [c.cancel() for c in calls])
        if self._db is not None:
            self._db.shutdown(wait=False)
            self._db = None

    def run_once(self, now: datetime | None = None) -> dict[str, Any]:
        """One sweep over everything due at ``now``; returns its summary.

        Raises :class:`keeper.errors.StoreError` when the database fails; the caller logs it.
        The results held then are kept for the next sweep (or :meth:`save_held`).
        """
        with self._lock:
            self.idle.clear()
            self.busy_since = self.last_turn = time.monotonic()
            try:
                return self.loop.run(SweepRun(self, now or self.clock()).run())
            except StoreError:
                metrics.sweep_failed()
                raise
            finally:
                self.busy_since = None
                self.idle.set()


class SweepRun:
    """The state of one sweep: what it claimed, what came back, why it ends. Run on the loop
    by :meth:`Sweeper.run_once`, which holds what outlives a sweep (results, leases, calls)."""

    def __init__(self, sweeper: Sweeper, cutoff: datetime) -> None:
        self.s = sweeper
        self.cutoff = cutoff
        self.config = sweeper.config
        self.counts: Counter[str] = Counter()
        self.lease_id = new_lease_id()
        self.apps = {a.appid for a in self.config.apps}
        self.drained: set[tuple[str, str]] = set()  # scans found short (Leases.claim)
        self.rejected: set[str] = set()  # WeChat refused the app itself: an operator's problem
        self.deferred: set[str] = set()  # the app's quota is used up for longer than we wait
        self.in_flight: dict[int, Grant] = {}  # claimed and not come back: queued or called
        self.queue: deque[Grant] = deque()  # claimed, no call started
        self.calling = 0  # calls under way (at most ``workers``)
        self.page = max(MIN_PAGE, 3 * self.config.workers)
        self.claim_at = max(self.page // 4, self.config.workers)
        self.exhausted = False
        self.streak = 0  # transient failures in a row
        self.unavailable = False
        self.stop_seen: float | None = None
        self.db_error: str | None = None  # the database failed: stop claiming, keep results
        self.bugs: set[tuple[str, int | None]] = set()  # (endpoint, errcode) logged
        self.unsettled = 0  # results taken since the last write
        self.over = False  # the sweep returned: what still comes back is held, not taken
        self._waiter: asyncio.Future[None] | None = None

    def room(self) -> bool:
        # Keep up to three workers' worth (at least MIN_PAGE) queued or in flight and claim
        # a workers' worth at a time (a quarter of the page at least): calls never wait for a
        # claim (a workers' worth is still queued while one runs), and a claim's statements
        # and transaction are shared by 64 grants at 64 workers (by 32 before, which cost a
        # third more of the database thread's CPU per grant).
        return self.page - len(self.in_flight) >= self.claim_at

    async def claim(self) -> None:
        if not self.room():
            return
        now = self.s.clock()
        with self.s._held_lock:
            exclude = set(self.s.held)
        batch = await self.s.db(
            self.s.store.claim,
            appids=sorted(self.apps - self.rejected - self.deferred), cutoff=self.cutoff,
            limit=self.page - len(self.in_flight), lease_id=self.lease_id, now=now,
            lease_s=self.config.lease_s, exclude=exclude, drained=self.drained,
        )
        self.exhausted = not batch
        for g in batch:
            self.in_flight[g.id] = g
            self.queue.append(g)
        self.start_calls()

    def start_calls(self) -> None:
        while self.queue and self.calling < self.config.workers:
            self.calling += 1
            self.s.start_call(self.queue.popleft(), self)

    def returned(self, r: Result) -> None:
        """A call's task came back with ``r`` (its write is held already)."""
        self.calling -= 1
        if self.over:
            return  # abandoned: its lease lapses (see abandon)
        self.take(r)
        self.start_calls()
        if (not self.in_flight or self.unsettled >= FLUSH_BATCH or self.db_error is not None
                or self.unavailable or (self.room() and not self.exhausted)):
            self.poke()

    def poke(self) -> None:
        """Wake the sweep's loop (:meth:`wait`) to claim, write or end now."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until a returning call pokes, at most ``timeout_s``."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self.poke)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

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
            self.s.worker.halt.set()  # calls not yet made give their grants back untouched
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
        if not self.queue:
            return
        ids = [g.id for g in self.queue]
        self.queue.clear()
        for i in ids:
            self.in_flight.pop(i, None)
        self.s.release_later(self.lease_id, ids)

    async def flush(self) -> None:
        if self.db_error is not None:
            return
        try:
            _, superseded = await self.s.db(self.s.write_held)
        except StoreError as e:
            self.database_failed(str(e))
            return
        self.counts["leases_lost"] += superseded
        metrics.leases_lost(superseded)
        self.unsettled = 0

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        # First what an earlier exit journaled and what an earlier sweep could not write:
        # nothing is claimed before they are committed (a failure here ends the sweep).
        await self.s.db(self.s.replay_journal)
        caught_up, _ = await self.s.db(self.s.write_held)
        if caught_up:
            log.info("results.caught_up", written=caught_up)
        sweep_id = await self.s.db(self.s.store.start_sweep, self.cutoff,
                                   host=socket.gethostname(), pid=os.getpid())
        log.info("sweep.started", sweep_id=sweep_id, cutoff=self.cutoff.isoformat())
        self.s.worker.halt.clear()
        last_flush = last_progress = time.monotonic()
        try:
            while True:
                now_m = self.s.last_turn = time.monotonic()
                if self.s.stop.is_set() and self.stop_seen is None:
                    self.stop_seen = now_m
                    log.info("sweep.stopping", in_flight=len(self.in_flight))
                ending = self.stop_seen is not None or self.db_error is not None
                if not ending and not self.exhausted and not self.unavailable:
                    try:
                        await self.claim()
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
                    await self.wait(FLUSH_EVERY_S)
                if (self.unsettled >= FLUSH_BATCH or not self.in_flight
                        or now_m - last_flush >= FLUSH_EVERY_S):
                    await self.flush()
                    last_flush = now_m
                if self.s.progress is not None:
                    self.s.progress(self.counts["grants_worked"], len(self.in_flight))
                if now_m - last_progress >= PROGRESS_EVERY_S:
                    last_progress = now_m
                    log.info("sweep.progress", sweep_id=sweep_id, in_flight=len(self.in_flight),
                             **{k: self.counts[k] for k in SUMMARY_KEYS})
        finally:
            self.over = True
        await self.flush()
        if self.db_error is not None:
            raise DatabaseUnavailable(self.db_error)
        if self.s.avatars is not None and self.stop_seen is None:
            # After the grants, holding no lease: avatar hosts cannot stall refreshes.
            self.counts.update(await self.s.db(
                self.s.avatars.run, self.s.stop,
                budget_s=max(30.0, self.config.sweep_interval_s)))
        summary = self.summary(started)
        await self.s.db(self.s.store.finish_sweep, sweep_id, self.s.clock(), summary)
        log.info("sweep.finished", sweep_id=sweep_id, **summary)
        metrics.sweep_finished(summary)
        return summary

    def abandon(self) -> None:
        """The grace is over: stop waiting for the calls that have not come back.

        Their leases are kept, not given back: a call still under way may yet bring WeChat's
        new tokens, and a grant released now would be claimed as if nobody held any, so a
        40030 for the tokens it replaced would be recorded at once. Left to lapse, the lease
        makes the next claim a takeover, whose 40030 is held until this process had its
        chance to write. Should the results still arrive, their tasks hold them in the
        sweeper.
        """
        self.unqueue()  # grants no worker started: no call was made, their leases go back
        self.counts["abandoned"] += len(self.in_flight)
        log.warning("sweep.abandoned", in_flight=len(self.in_flight))
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
