"""One sweep: claim what is due, work it with ``workers`` calls in flight, write the results.

The sweep's own thread claims grants in small pages (never the whole table), hands them to a
pool of daemon worker threads, and writes results in batches, so one database writer per
process does all the writing. It checks the stop flag between pages; workers check it between
WeChat calls. When WeChat stops answering (a streak of transient failures with no success),
the sweep stops calling it and ends early; the next sweep probes again.

Nothing WeChat answered is lost to the database: a worker hands its result to the
:class:`Sweeper` (not to one sweep), which holds it until it is committed. When the database
fails, the sweep stops claiming, lets the calls in flight come back, and ends with
:class:`DatabaseUnavailable`; the held results are written first thing in the next sweep
(their grants are not claimed again meanwhile), and if the process must exit before that,
they go to the local journal (:mod:`keeper.sweep.journal`), which the next start replays.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog

from keeper.avatars.sweep_pass import AvatarKeeper
from keeper.clock import utcnow
from keeper.config import Config
from keeper.core.models import Grant
from keeper.errors import DatabaseUnavailable, StoreError
from keeper.metrics import process as metrics
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite
from keeper.sweep.journal import Journal
from keeper.sweep.run import SweepRun
from keeper.sweep.worker import Result, Worker

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.sweep")

#: Results written per transaction when held results are caught up after an outage.
CATCH_UP_BATCH = 500



_Task = tuple[Grant, str, "queue.Queue[Result]"]


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
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # one sweep at a time in this process
        self._held_lock = threading.Lock()
        #: Results not yet committed, by grant id (written by worker threads).
        self.held: dict[int, Held] = {}
        #: Leases to give back (grants that were claimed and not worked), by lease id.
        self._releases: dict[str, set[int]] = {}
        self._working = 0  # worker threads inside Worker.work
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

    def _start_threads(self) -> None:
        while len(self._threads) < self.config.workers:
            t = threading.Thread(target=self._loop, name=f"keeper-worker-{len(self._threads)}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _loop(self) -> None:
        while (task := self._tasks.get()) is not None:
            grant, lease_id, results = task
            with self._held_lock:
                self._working += 1
            try:
                result = self.worker.work(grant)  # never raises: keeps what WeChat answered
            finally:
                with self._held_lock:
                    self._working -= 1
            if result.write is not None:
                # Held by the process, not by the sweep that asked: a sweep that ended
                # (database down, shutdown) cannot drop it.
                with self._held_lock:
                    self.held[grant.id] = Held(result.write, lease_id)
            results.put(result)

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
        """End the worker threads (they are daemons; this is for tidy tests)."""
        for _ in self._threads:
            self._tasks.put(None)
        self._threads.clear()

    def run_once(self, now: datetime | None = None) -> dict[str, Any]:
        """One sweep over everything due at ``now``; returns its summary.

        Raises :class:`keeper.errors.StoreError` when the database fails; the caller logs it.
        The results held then are kept for the next sweep (or :meth:`save_held`).
        """
        with self._lock:
            self.idle.clear()
            self.busy_since = self.last_turn = time.monotonic()
            try:
                return SweepRun(self, now or self.clock()).run()
            except StoreError:
                metrics.sweep_failed()
                raise
            finally:
                self.busy_since = None
                self.idle.set()
