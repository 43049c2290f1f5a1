"""``keeper run``: an in-memory APScheduler that sweeps every ``sweep_interval``.

Each process has its own scheduler (APScheduler's job stores cannot be shared between
processes); processes coordinate only through the database. Signal handlers only set flags;
the main thread waits on an Event and shuts down in a fixed, logged order.
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import UTC, datetime
from types import FrameType

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from keeper.errors import StoreError
from keeper.sweep import Sweeper

log = structlog.get_logger(__name__)


class Service:
    """The long-running service around a :class:`Sweeper`."""

    def __init__(self, *, sweeper: Sweeper, interval_s: float, stop: threading.Event) -> None:
        self.sweeper = sweeper
        self.interval_s = interval_s
        self.stop = stop
        self.wake = threading.Event()
        self._signals = 0
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    def sweep_job(self) -> None:
        """The scheduled job: one sweep; a failure is logged and the next interval tries again."""
        if self.stop.is_set():
            return
        try:
            self.sweeper.run_once()
        except StoreError as e:
            log.error("sweep.failed", error=str(e))
        except Exception:
            log.exception("sweep.crashed")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(1)  # a second signal: the operator wants out now
        self.stop.set()
        self.wake.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def run(self) -> int:
        """Sweep now and every interval until SIGTERM/SIGINT; returns the exit code."""
        self.scheduler.add_job(
            self.sweep_job, "interval", seconds=self.interval_s, id="sweep",
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.start()
        log.info("scheduler.started", interval_s=self.interval_s)
        while not self.stop.is_set():
            self.wake.wait()
            self.wake.clear()
        log.info("keeper.stopping", step="scheduler")
        # wait=True lets a running sweep finish: it sees the stop flag, stops claiming,
        # lets calls in flight finish (or abandons them after a grace) and writes results.
        self.scheduler.shutdown(wait=True)
        log.info("keeper.stopping", step="workers")
        self.sweeper.close()
        return 0

