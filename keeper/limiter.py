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

import asyncio
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from keeper.clock import utcnow
from keeper.config import AppConfig
from keeper.core.quota import Decision, Gcra, pause_until, paused_tat_us, take
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

#: A take's answer: the decision, the database's time of it (microseconds) and the moment it
#: came back (monotonic seconds).
_Taken = tuple[Decision, int, float]

#: What one look at a pool tells a caller (:meth:`QuotaGate._look`).
_GRANTED = None  # a permit was taken
_ASK = 0.0  # ask the database (the pool says this caller is asking)


@dataclass
class _Pool:
    params: Gcra | None
    #: Guards the fields below, and only ever for bookkeeping: nobody holds it across a
    #: database round trip, so the event loop may take it too.
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Threads waiting for a permit wait on it; tasks on an event loop wait on a future.
    ready: threading.Condition = field(init=False)
    tasks: list[asyncio.Future[None]] = field(default_factory=list)
    permits: int = 0
    expires: float = 0.0  # monotonic seconds
    waiting: int = 0  # callers waiting for a permit
    #: When the last take found no room: no permit before ``next_at`` (monotonic), which is
    #: ``next_until`` by the database's clock; until then callers wait instead of asking.
    next_at: float = 0.0
    next_until: datetime | None = None
    #: A caller is asking the database for permits: the others wait for what it pools.
    asking: bool = False
    #: Bumped by a pause: permits from a take begun before it are not handed out.
    generation: int = 0

    def __post_init__(self) -> None:
        self.ready = threading.Condition(self.lock)

    def wake(self) -> None:
        """Wake every waiting caller to look again (called holding ``lock``)."""
        self.ready.notify_all()
        tasks, self.tasks = self.tasks, []
        for future in tasks:
            _resolve(future)


def _resolve(future: asyncio.Future[None]) -> None:
    """Wake a task waiting on ``future``, from its loop's thread or any other."""
    loop = future.get_loop()
    try:
        here = asyncio.get_running_loop() is loop
    except RuntimeError:
        here = False
    if here:
        if not future.done():
            future.set_result(None)
    elif not loop.is_closed():
        loop.call_soon_threadsafe(_set_done, future)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class QuotaGate:
    """Hands out permits for WeChat calls; makes callers wait while the quota is used up.

    Threads call :meth:`acquire`, tasks on an event loop :meth:`acquire_async` (which asks the
    database from a thread, never on the loop); both share one pool per (app, endpoint).
    """

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

        Raises :class:`QuotaWait` when the next permit is more than ``max_wait_s`` away,
        :class:`Stopped` when shutdown begins while waiting, and StoreError when the
        database cannot be asked.
        """
        pool = self._pools.get((appid, endpoint))
        if pool is None or pool.params is None:
            return
        while True:
            if self.stop.is_set():
                raise Stopped("shutting down")
            with pool.lock:
                step = self._look(pool, appid, endpoint, max_wait_s)
                if step is _GRANTED:
                    return
                generation = pool.generation
                if step != _ASK:
                    # Registered and waiting under the lock of the look: no wake-up is missed.
                    pool.waiting += 1
                    waited = time.monotonic()
                    try:
                        pool.ready.wait(min(step, STOP_CHECK_S))
                    finally:
                        pool.waiting -= 1
            if step != _ASK:
                metrics.quota_waited(appid, endpoint, time.monotonic() - waited)
                continue
            taken = None
            try:
                taken = self._take(pool, appid, endpoint)
            finally:
                with pool.lock:
                    granted = self._settle(pool, appid, endpoint, generation, taken, max_wait_s)
            if granted:
                return

    async def acquire_async(self, appid: str, endpoint: str, *,
                            max_wait_s: float = 60.0) -> None:
        """:meth:`acquire` for a task on an event loop: it waits without blocking the loop,
        and the database is asked from a thread of the loop's executor."""
        pool = self._pools.get((appid, endpoint))
        if pool is None or pool.params is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            if self.stop.is_set():
                raise Stopped("shutting down")
            with pool.lock:
                step = self._look(pool, appid, endpoint, max_wait_s)
                if step is _GRANTED:
                    return
                generation = pool.generation
                if step != _ASK:
                    future: asyncio.Future[None] = loop.create_future()
                    pool.tasks.append(future)
                    pool.waiting += 1
            if step != _ASK:
                await self._wait_async(pool, future, step, appid, endpoint)
                continue
            taken = None
            try:
                taken = await asyncio.to_thread(self._take, pool, appid, endpoint)
            finally:
                with pool.lock:
                    granted = self._settle(pool, appid, endpoint, generation, taken, max_wait_s)
            if granted:
                return

    @staticmethod
    async def _wait_async(pool: _Pool, future: asyncio.Future[None], seconds: float,
                          appid: str, endpoint: str) -> None:
        """Wait on ``future`` (registered in ``pool.tasks``) to be woken, up to ``seconds`` and
        at most STOP_CHECK_S, so that a stop is seen."""
        timer = future.get_loop().call_later(min(seconds, STOP_CHECK_S), _set_done, future)
        waited = time.monotonic()
        try:
            await future
        finally:
            timer.cancel()
            with pool.lock:
                pool.waiting -= 1
                if future in pool.tasks:
                    pool.tasks.remove(future)
        metrics.quota_waited(appid, endpoint, time.monotonic() - waited)

    def _look(self, pool: _Pool, appid: str, endpoint: str, max_wait_s: float) -> float | None:
        """One look at the pool, holding its lock: ``_GRANTED`` (a permit taken), ``_ASK``
        (this caller asks the database), or the seconds to wait before looking again."""
        now = time.monotonic()
        if pool.permits > 0 and now < pool.expires:
            pool.permits -= 1
            return _GRANTED
        if now < pool.next_at and pool.next_until is not None:
            # A caller was told a moment ago when the next permit fits: wait for then (or
            # for permits a take pools) rather than ask the database again.
            if pool.next_at - now > max_wait_s:
                raise self._exhausted(appid, endpoint, pool.next_until)
            return pool.next_at - now
        if pool.asking:
            return STOP_CHECK_S  # woken when the caller asking has its answer
        pool.asking = True
        return _ASK

    def _take(self, pool: _Pool, appid: str, endpoint: str) -> _Taken | None:
        """Ask the database for up to ``batch`` permits (never holding ``pool.lock``)."""
        params = pool.params
        assert params is not None
        taken = self.store.quota_take(
            appid, endpoint, lambda tat, now_us: take(params, tat, now_us, self.batch),
            period_us=params.period_us)
        # The moment the answer came, taken here: a task learns it only when the loop runs it
        # again, and that wait must count against the permits' half slack too.
        return None if taken is None else (*taken, time.monotonic())

    def _settle(self, pool: _Pool, appid: str, endpoint: str, generation: int,
                taken: _Taken | None, max_wait_s: float) -> bool:
        """Pool what the database answered the asking caller (holding ``pool.lock``) and wake
        the waiting ones; True when the asking caller has its permit, False when it looks
        again (the next look tells it how long to wait)."""
        pool.asking = False
        pool.wake()
        params = pool.params
        assert params is not None
        if taken is None:
            return False  # the database failed (raised) or another process took first
        decision, now_us, answered = taken
        if decision.granted:
            metrics.quota_taken(appid, endpoint, decision.granted)
            expires = answered + params.slack_s / 2
            if generation != pool.generation or time.monotonic() >= expires:
                # A pause came meanwhile, or the answer reached the caller too late (a busy
                # loop, a stopped process): these permits are not used, the quota's promise
                # holds only for calls made within the slack of their grant.
                return False
            pool.permits = decision.granted - 1
            pool.expires = expires
            pool.next_at = 0.0
            return True
        until = datetime.fromtimestamp(now_us / 1_000_000 + decision.wait_s, UTC)
        if generation == pool.generation:
            pool.next_at, pool.next_until = answered + decision.wait_s, until
        if decision.wait_s > max_wait_s:
            raise self._exhausted(appid, endpoint, until)
        return False

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
        places the window. This process's callers wait from the moment the pause is known,
        and permits a take begun before it are not handed out.
        """
        db_now = now or self.store.db_clock()
        until = pause_until(errcode, self.quotas.get((appid, endpoint)), db_now)
        pool = self._pools.get((appid, endpoint))
        if pool is not None and pool.params is not None:
            with pool.lock:
                pool.permits = 0
                pool.generation += 1
                pool.next_at = time.monotonic() + (until - db_now).total_seconds()
                pool.next_until = until
                pool.wake()
            self.store.quota_hold(appid, endpoint, paused_tat_us(pool.params, until))
        log.warning("quota.paused", appid=appid, endpoint=endpoint, errcode=errcode,
                    until=until.isoformat())
        return until

    async def pause_async(self, appid: str, endpoint: str, errcode: int) -> datetime:
        """:meth:`pause` from a task on an event loop (its database work in a thread)."""
        return await asyncio.to_thread(self.pause, appid, endpoint, errcode)
