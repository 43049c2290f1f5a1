"""``keeper run``: an in-memory APScheduler that sweeps every ``sweep_interval``, as a systemd
service, and delivers events to webhooks on threads of its own. Each process has its own
scheduler (APScheduler's job stores cannot be shared between processes); processes coordinate
only through the database. Signal handlers only set flags and wake the main thread through a
pipe (:class:`Wakeup`); the main thread sets the stop flag the other threads read, pings
systemd's watchdog, applies reloads and shuts down in a fixed, logged
order: scheduler, in-flight sweep, events, leases, metrics, engine.

Signals: SIGTERM/SIGINT stop gracefully (a second one exits at once); SIGHUP reloads the
configuration file, then sweeps; SIGUSR1 sweeps now.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, timedelta
from types import FrameType

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from keeper.clock import utcnow
from keeper.config import Config
from keeper.config.webhooks import require_secrets
from keeper.errors import ConfigError, DatabaseUnavailable, KeeperError, SchemaOutdated, StoreError
from keeper.log import set_level
from keeper.service.metrics import start_metrics, stop_metrics
from keeper.service.notify import Notifier, sweep_status
from keeper.service.runtime import Runtime, cipher_for
from keeper.sweep.engine import Sweeper

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.scheduler")

#: A sweep whose loop has not turned for this long is hung: the watchdog stops pinging.
HUNG_AFTER_S = 120.0
#: Longest pause between sweep attempts while the database is down.
DB_BACKOFF_CAP_S = 300.0
#: From SIGTERM to exit, at most (systemd's TimeoutStopSec is 15 s): a sweep stuck in the
#: database past this is left behind, its held results journaled.
STOP_DEADLINE_S = 8.0


class Wakeup:
    """Wakes the main thread from a signal handler: one byte down a pipe, read by ``select``.

    A handler runs in the main thread between two of its bytecodes, possibly while that thread
    holds an Event's lock (inside ``Event.wait`` or ``clear``). Setting an Event there waits
    for that lock for ever: the process hangs, deaf to every later signal, SIGTERM included.
    A write to a non-blocking pipe takes no lock.

    The pipe is also the process's ``signal.set_wakeup_fd``: the kernel may deliver a signal
    to any thread (another whenever the main thread already has one pending), and Python runs
    the handler only when the main thread next runs; the byte CPython's C-level handler writes
    from whichever thread got the signal is what wakes the main thread's ``select``."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def arm_for_signals(self) -> None:
        """Have every signal wake :meth:`wait` (main thread only)."""
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self._write, b"!")

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a poke; True (and the pokes consumed) if one came."""
        ready, _, _ = select.select([self._read], [], [], max(0.0, timeout_s))
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 512):
                pass
        return True


class Service:
    """The long-running service. ``load`` re-reads the configuration file (for SIGHUP)."""

    def __init__(
        self, *, config: Config, load: Callable[[], Config], notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.load = load
        self.notifier = notifier or Notifier()
        self.stop = threading.Event()
        self.wakeup = Wakeup()
        self._signals = 0
        self._stop_at: float | None = None
        self._reload = False
        self._sweep_now = False
        self._pending: Config | None = None
        self._db_failures = 0
        self._swap = threading.Lock()
        self.runtime = Runtime.build(config, open_store=False, stop=self.stop)
        self.deliverer = self.runtime.deliverer()  # [[webhooks]]: read at start only
        self.sweeper: Sweeper = self.runtime.sweeper()
        self.sweeper.on_written = self.deliverer.poke
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    # -- signals (handlers only set flags) ---------------------------------------------------

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(1)  # a second signal: the operator wants out now
        self._stop_at = time.monotonic()
        self.wakeup.poke()

    def _on_reload(self, signum: int, _frame: FrameType | None) -> None:
        self._reload = True
        self.wakeup.poke()

    def _on_sweep(self, signum: int, _frame: FrameType | None) -> None:
        self._sweep_now = True
        self.wakeup.poke()

    def _stopping(self) -> bool:
        """Whether shutdown has begun; the first time after SIGTERM/SIGINT, sets the stop flag
        the sweep and delivery threads read (here, in the main thread, never in a handler)."""
        if self._stop_at is not None and not self.stop.is_set():
            self.stop.set()
        return self.stop.is_set()

    def install_signals(self) -> None:
        self.wakeup.arm_for_signals()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_sweep)

    # -- the sweep job (scheduler thread) --------------------------------------------------

    def sweep_job(self) -> None:
        """One sweep; failures are logged once and the next attempt backs off."""
        if self.stop.is_set():
            return
        self._apply_pending()
        try:
            summary = self.sweeper.run_once()
        except DatabaseUnavailable as e:
            self._db_failed(str(e))
            return
        except StoreError as e:
            log.error("sweep.failed", error=str(e))
            self._db_failed(None)
            return
        except Exception:
            log.exception("sweep.crashed")
            return
        if self._db_failures:
            log.info("database.recovered", after_failures=self._db_failures)
            self._db_failures = 0
        self.notifier.status(sweep_status(summary))

    def _db_failed(self, error: str | None) -> None:
        self._db_failures += 1
        delay = min(DB_BACKOFF_CAP_S, self.config.sweep_interval_s * 2 ** (self._db_failures - 1))
        held = self.sweeper.held_count()
        # Once per outage at error level; the attempts after it at debug.
        if error is not None:
            (log.error if self._db_failures == 1 else log.debug)(
                "database.unavailable", error=error, failures=self._db_failures,
                retry_in_s=round(delay, 1), results_held=held)
        self.notifier.status(f"database unavailable; retrying in {delay:.0f} s")
        job = self.scheduler.get_job("sweep")
        if job is not None and not self.stop.is_set():
            job.modify(next_run_time=utcnow() + timedelta(seconds=delay))

    def _apply_pending(self) -> None:
        """A reloaded configuration takes effect between sweeps."""
        with self._swap:
            config, self._pending = self._pending, None
        if config is None:
            return
        try:
            runtime = Runtime.build(config, open_store=False, stop=self.stop)
        except KeeperError as e:
            log.error("config.reload_refused", error=str(e))
            return
        try:
            runtime.store.open()
        except StoreError as e:  # the sweep will say so, and back off
            log.error("database.unavailable", error=str(e))
        except KeeperError as e:  # e.g. keys that cannot read this database
            log.error("config.reload_refused", error=str(e))
            runtime.close()
            return
        old, old_sweeper = self.runtime, self.sweeper
        old_sweeper.close()
        self.runtime = runtime
        self.sweeper = runtime.sweeper()
        self.sweeper.adopt(old_sweeper)  # results not yet written are carried over
        self.sweeper.on_written = self.deliverer.poke
        self.config = config
        old.close()

    # -- main thread -------------------------------------------------------------------------

    def _wait_for_database(self) -> bool:
        """Block until the schema is usable or shutdown begins; True if usable."""
        delay = 1.0
        attempts = 0
        while not self._stopping():
            try:
                self.runtime.store.open()
                return True
            except (DatabaseUnavailable, SchemaOutdated) as e:
                event = ("database.schema_outdated" if isinstance(e, SchemaOutdated)
                         else "database.unavailable")
                attempts += 1
                # Once at error level; each further attempt at debug (systemd's STATUS shows
                # that keeper is still waiting).
                (log.error if attempts == 1 else log.debug)(
                    event, error=str(e), retry_in_s=delay, attempts=attempts)
                self.notifier.status(f"waiting for the database: {e}")
            self._tick(delay)
            delay = min(60.0, delay * 2)
        return False

    def _tick(self, seconds: float) -> None:
        """Wait up to ``seconds``, pinging the watchdog meanwhile; returns early on a signal."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            self.watchdog()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            interval = self.notifier.watchdog_s / 2 if self.notifier.watchdog_s else left
            if self.wakeup.wait(min(left, interval)):
                return

    def healthy(self) -> bool:
        """Not hung: no sweep running, or the running one's loop turned recently."""
        busy = self.sweeper.busy_since
        return busy is None or time.monotonic() - self.sweeper.last_turn < HUNG_AFTER_S

    def watchdog(self) -> None:
        if self.notifier.watchdog_s and self.healthy():
            self.notifier.watchdog()

    def _do_reload(self) -> None:
        self.notifier.reloading()
        try:
            config = self.load()
            cipher_for(config)  # a key file that cannot be read is refused now, not later
            # So is a webhook whose secret this process cannot read: webhooks are read at
            # start only, and the next start would refuse it.
            require_secrets(config.webhooks)
        except ConfigError as e:
            log.error("config.reload_refused", error=str(e))
            self.notifier.ready("reload refused; running with the previous configuration")
            return
        set_level(config.log_level)
        with self._swap:
            self._pending = config
        job = self.scheduler.get_job("sweep")
        if job is not None and config.sweep_interval_s != self.config.sweep_interval_s:
            job.reschedule("interval", seconds=config.sweep_interval_s)
        log.info("config.reloaded", **config.redacted())
        self.notifier.ready("configuration reloaded")
        self._sweep_now = True  # `systemctl reload keeper` is how operators ask for a sweep

    def _request_sweep(self) -> None:
        job = self.scheduler.get_job("sweep")
        log.info("sweep.requested", running=self.sweeper.busy_since is not None)
        if job is not None:
            # A sweep already running finishes first: max_instances=1 queues nothing, so the
            # request is kept until the scheduler can start one.
            job.modify(next_run_time=utcnow())

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        self.notifier.status("starting")
        self.metrics = start_metrics(self.config, store=lambda: self.runtime.store,
                                     current=lambda: self.config)
        if not self._wait_for_database():
            return self._shutdown()
        self.scheduler.add_job(
            self.sweep_job, "interval", seconds=self.config.sweep_interval_s, id="sweep",
            next_run_time=utcnow(),
        )
        self.scheduler.start()
        self.deliverer.start()  # threads of its own: a dead receiver never slows a sweep
        log.info("scheduler.started", interval_s=self.config.sweep_interval_s,
                 watchdog_s=self.notifier.watchdog_s)
        self.notifier.ready("running")
        while not self._stopping():
            if self._reload:
                self._reload = False
                self._do_reload()
            if self._sweep_now and self.sweeper.busy_since is None:
                self._sweep_now = False
                self._request_sweep()
            # A sweep asked for while one runs is started as soon as that one ends.
            idle = 0.5 if self._sweep_now else 3600.0
            self._tick(min(idle, self.notifier.watchdog_s / 2) if self.notifier.watchdog_s
                       else idle)
        return self._shutdown()

    def _shutdown(self) -> int:
        self.notifier.stopping()
        log.info("keeper.stopping", step="scheduler")
        if self.scheduler.running:
            # A running sweep sees the stop flag, stops claiming, lets calls in flight come
            # back (or gives their grants back after a grace), writes results and releases
            # leases before it returns; it is not waited for past the deadline.
            self.scheduler.shutdown(wait=False)
        deadline = (self._stop_at or time.monotonic()) + STOP_DEADLINE_S
        log.info("keeper.stopping", step="sweep")
        finished = self.sweeper.idle.wait(max(0.0, deadline - time.monotonic()))
        # Calls whose grants the sweep gave back may still bring answers: wait for them too.
        while finished and self.sweeper.working() and time.monotonic() < deadline:
            self.stop.wait(0.05)
        log.info("keeper.stopping", step="events")  # attempts in flight; leases given back
        self.deliverer.join(deadline)
        log.info("keeper.stopping", step="results", held=self.sweeper.held_count())
        # What the database did not take (it is down, or the sweep is stuck in it) is kept
        # in the journal, which the next start writes before it claims anything.
        self.sweeper.save_held()
        if not finished:
            log.warning("keeper.stopped", forced=True,
                        reason="a sweep is stuck in the database; its leases lapse by themselves")
            self.notifier.close()
            sys.stderr.flush()
            os._exit(0)  # the sweep's thread cannot be interrupted inside the driver
        log.info("keeper.stopping", step="workers")
        self.sweeper.close()
        stop_metrics(self.metrics)
        log.info("keeper.stopping", step="database")
        self.deliverer.close()
        self.runtime.close()
        self.notifier.close()
        log.info("keeper.stopped")
        return 0
