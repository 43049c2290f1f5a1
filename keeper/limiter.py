"""Quota permits shared by every keeper process through the database.

Each process keeps a small local pool of permits per (app, endpoint), refilled from the GCRA
row in the store by compare-and-swap (see :mod:`keeper.core.quota`), at the database's time:
every host's permits are placed on that one clock (:mod:`keeper.store.clock`). A permit is
used at once or lapses after half the quota's slack, so a permit never reaches WeChat later
than the arithmetic allows. Callers waiting are woken to use the permits a take pools; while
the quota has no room, one caller asks the database and the others wait for the moment it was
told (a herd of callers asking at every permit would cost a transaction each).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from keeper.clock import utcnow
from keeper.config import AppConfig
from keeper.core.quota import Gcra, pause_until, paused_tat_us, take
from keeper.errors import KeeperError, StoreError
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


#: A caller waiting for a permit looks at the stop flag at least this often.
STOP_CHECK_S = 0.5


@dataclass
class _Pool:
    params: Gcra | None
    #: Guards the fields below; callers waiting for a permit wait on it and are woken when
    #: permits are pooled.
    ready: threading.Condition = field(default_factory=threading.Condition)
    permits: int = 0
    expires: float = 0.0  # monotonic seconds
    waiting: int = 0  # callers waiting for a permit
    #: When the last take found no room: no permit before ``next_at`` (monotonic), which is
    #: ``next_until`` by the database's clock; until then callers wait instead of asking.
    next_at: float = 0.0
    next_until: datetime | None = None


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
            with pool.ready:
                now = time.monotonic()
                if pool.permits > 0 and now < pool.expires:
                    pool.permits -= 1
                    return
                if now < pool.next_at and pool.next_until is not None:
                    # Another caller was told a moment ago when the next permit fits: wait
                    # for then (or for permits it pools) rather than ask the database again.
                    if pool.next_at - now > max_wait_s:
                        raise self._exhausted(appid, endpoint, pool.next_until)
                    self._wait(pool, appid, endpoint, pool.next_at - now)
                    continue
                taken = self.store.quota_take(
                    appid, endpoint, lambda tat, now_us: take(params, tat, now_us, self.batch),
                    period_us=params.period_us)
                if taken is None:
                    continue  # another process took permits first: look again
                decision, now_us = taken
                if decision.granted:
                    pool.permits = decision.granted - 1
                    pool.expires = time.monotonic() + params.slack_s / 2
                    pool.next_at = 0.0
                    if pool.permits:  # callers waiting use them before they lapse
                        pool.ready.notify(pool.permits)
                    metrics.quota_taken(appid, endpoint, decision.granted)
                    return
                until = datetime.fromtimestamp(now_us / 1_000_000 + decision.wait_s, UTC)
                if decision.wait_s > max_wait_s:
                    raise self._exhausted(appid, endpoint, until)
                pool.next_at, pool.next_until = time.monotonic() + decision.wait_s, until
                self._wait(pool, appid, endpoint, decision.wait_s)

    def _wait(self, pool: _Pool, appid: str, endpoint: str, seconds: float) -> None:
        """Wait (holding ``pool.ready``) up to ``seconds`` for pooled permits; at most
        STOP_CHECK_S, so that a stop is seen."""
        pool.waiting += 1
        waited = time.monotonic()
        try:
            pool.ready.wait(min(seconds, STOP_CHECK_S))
        finally:
            pool.waiting -= 1
        metrics.quota_waited(appid, endpoint, time.monotonic() - waited)

    @staticmethod
    def _exhausted(appid: str, endpoint: str, until: datetime) -> QuotaWait:
        metrics.quota_exhausted(appid, endpoint)
        return QuotaWait(appid, endpoint, until)

    def seconds_until(self, until: datetime) -> float:
        """Seconds from now to ``until``, a moment on the database's clock (a quota pause, the
        next permit), measured on that clock: a host whose own clock is off still tells an
        application the right wait. This host's clock when the database cannot be read."""
        try:
            now = self.store.db_clock()
        except StoreError:
            now = utcnow()
        return (until - now).total_seconds()

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
            with pool.ready:
                pool.permits, pool.next_at = 0, 0.0
                self.store.quota_hold(appid, endpoint, paused_tat_us(pool.params, until))
        log.warning("quota.paused", appid=appid, endpoint=endpoint, errcode=errcode,
                    until=until.isoformat())
        return until
