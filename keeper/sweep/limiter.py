"""Quota permits shared by every keeper process through the database.

Each process keeps a small local pool of permits per (app, endpoint), refilled from the GCRA
row in the store by compare-and-swap (see :mod:`keeper.core.quota`), at the database's time:
every host's permits are placed on that one clock (:mod:`keeper.store.clock`). A permit is
used at once or lapses after half the quota's slack, so a permit never reaches WeChat later
than the arithmetic allows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from keeper.config import AppConfig
from keeper.core.quota import Gcra, pause_until, paused_tat_us, take
from keeper.errors import KeeperError
from keeper.metrics import process as metrics
from keeper.store.grants import Store

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.limiter")


class QuotaWait(KeeperError):
    """The next permit is further away than the caller will wait."""

    def __init__(self, appid: str, endpoint: str, until: datetime) -> None:
        super().__init__(f"{endpoint} quota of {appid} is exhausted until {until.isoformat()}")
        self.appid = appid
        self.endpoint = endpoint
        self.until = until


class Stopped(KeeperError):
    """Keeper is shutting down; the call was not made."""


@dataclass
class _Pool:
    params: Gcra | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    permits: int = 0
    expires: float = 0.0  # monotonic seconds


class QuotaGate:
    """Hands out permits for WeChat calls; blocks while the quota is used up."""

    def __init__(
        self, *, store: Store, apps: Mapping[str, AppConfig], stop: threading.Event,
        batch: int = 32,
    ) -> None:
        self.store = store
        self.stop = stop
        self.batch = max(1, batch)
        self._pools: dict[tuple[str, str], _Pool] = {}
        for app in apps.values():
            for endpoint, quota in app.quotas.items():
                params = Gcra.for_quota(quota) if quota else None
                self._pools[(app.appid, endpoint)] = _Pool(params)
        self.quotas = {(a.appid, e): q for a in apps.values() for e, q in a.quotas.items()}

    def acquire(self, appid: str, endpoint: str, *, max_wait_s: float = 60.0) -> None:
        """Return once one call to ``endpoint`` for ``appid`` may be made.

        Raises :class:`QuotaWait` when the next permit is more than ``max_wait_s`` away and
        :class:`Stopped` when shutdown begins while waiting.
        """
        pool = self._pools.get((appid, endpoint))
        if pool is None or pool.params is None:
            return
        params = pool.params
        while True:
            if self.stop.is_set():
                raise Stopped("shutting down")
            with pool.lock:
                if pool.permits > 0 and time.monotonic() < pool.expires:
                    pool.permits -= 1
                    return
                taken = self.store.quota_take(
                    appid, endpoint, lambda tat, now_us: take(params, tat, now_us, self.batch),
                    period_us=params.period_us)
                if taken is None:
                    continue  # another process took permits first: look again
                decision, now_us = taken
                if decision.granted:
                    pool.permits = decision.granted - 1
                    pool.expires = time.monotonic() + params.slack_s / 2
                    metrics.quota_taken(appid, endpoint, decision.granted)
                    return
            if decision.wait_s > max_wait_s:
                until = datetime.fromtimestamp(now_us / 1_000_000 + decision.wait_s, UTC)
                metrics.quota_exhausted(appid, endpoint)
                raise QuotaWait(appid, endpoint, until)
            waited = time.monotonic()
            self.stop.wait(decision.wait_s)
            metrics.quota_waited(appid, endpoint, time.monotonic() - waited)

    def pause(self, appid: str, endpoint: str, errcode: int,
              now: datetime | None = None) -> datetime:
        """WeChat answered 45011/45009: no process calls ``endpoint`` until its window rolls.

        ``now`` (default: the database's clock, which every host's permits are measured by)
        places the window.
        """
        until = pause_until(errcode, self.quotas.get((appid, endpoint)), now or
                            self.store.db_clock())
        pool = self._pools.get((appid, endpoint))
        if pool is not None and pool.params is not None:
            with pool.lock:
                pool.permits = 0
                self.store.quota_hold(appid, endpoint, paused_tat_us(pool.params, until))
        log.warning("quota.paused", appid=appid, endpoint=endpoint, errcode=errcode,
                    until=until.isoformat())
        return until
