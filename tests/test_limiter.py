"""The quota gate on a real store: callers waiting for room do not each ask the database, a
stop reaches a caller that waits, threads and tasks on an event loop share one pool."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import pytest

from keeper.config import AppConfig
from keeper.core.quota import Gcra, parse_quota
from keeper.errors import DatabaseUnavailable
from keeper.limiter import STOP_CHECK_S, QuotaGate, QuotaWait, Stopped
from keeper.store.grants import Store
from tests.conftest import wait_for


def _gate(store: Store, quota: str, stop: threading.Event) -> QuotaGate:
    app = AppConfig(appid="wx1", secret=None, secret_source="test", refresh_token_days=30,
                    refresh_at_day=29, quotas={"refresh": parse_quota(quota)})
    return QuotaGate(store=store, apps={"wx1": app}, stop=stop)


def _count_takes(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    takes: list[Any] = []
    real = store.quota_take

    def counted(*args: Any, **kwargs: Any) -> Any:
        taken = real(*args, **kwargs)
        takes.append(taken)
        return taken

    monkeypatch.setattr(store, "quota_take", counted)
    return takes


def test_callers_waiting_for_room_leave_the_asking_to_one(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a quota with no burst (one permit each 113 ms) and six callers at once, when they
    all get their permit, then the database was asked at most twice a permit (the caller whose
    turn it is, and one that learns when the next fits), not by every waiting caller at every
    permit (21 takes for six permits)."""
    gate = _gate(store, "10/second", threading.Event())
    takes = _count_takes(store, monkeypatch)
    got: list[float] = []
    callers = [threading.Thread(target=lambda: (gate.acquire("wx1", "refresh"),
                                                got.append(time.monotonic())))
               for _ in range(6)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(timeout=10)
    assert len(got) == 6
    granted = sum(1 for t in takes if t is not None and t[0].granted)
    assert granted == 6
    assert len(takes) <= 2 * 6 + 1, [t and t[0] for t in takes]
    # The quota held: 10 in any 1 s, with no burst, is one permit per 105 ms at most (1 s and
    # the slack, over 10), by the database's clock at each grant (when a thread then runs is
    # the machine's business).
    assert_spaced([t for t in takes if t is not None and t[0].granted], "10/second")


def assert_spaced(granted: list[Any], quota: str) -> None:
    """Each take that granted did so one emission interval of ``quota`` (no burst) or more
    after the one before it."""
    interval_us = Gcra.for_quota(parse_quota(quota)).interval_us
    at = sorted(now_us for _, now_us in granted)
    assert all(b - a >= interval_us for a, b in itertools.pairwise(at)), at


def test_a_caller_waiting_for_a_permit_sees_a_stop(store: Store) -> None:
    """Given a caller waiting 10 s for the next permit, when keeper stops, then it gives up
    within STOP_CHECK_S with Stopped (the call is not made)."""
    stop = threading.Event()
    gate = _gate(store, "1/10 seconds", stop)
    gate.acquire("wx1", "refresh")  # the only permit for 10 s
    failed: list[BaseException] = []

    def second() -> None:
        try:
            gate.acquire("wx1", "refresh")
        except Stopped as e:
            failed.append(e)

    caller = threading.Thread(target=second)
    caller.start()
    wait_for(lambda: gate._pools[("wx1", "refresh")].waiting == 1)
    stopped = time.monotonic()
    stop.set()
    caller.join(timeout=5)
    assert failed and time.monotonic() - stopped < STOP_CHECK_S + 0.5


def test_tasks_on_a_loop_share_the_pool_and_the_asking(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a quota of 100 a second (a burst of one: two permits a take) and 40 tasks on one
    event loop, when they all acquire, then each got a permit, the quota held (by the
    database's grants, at most 100 in any second), and the database was asked at most about
    twice per take that granted, not by every waiting task."""
    gate = _gate(store, "100/second", threading.Event())
    takes = _count_takes(store, monkeypatch)

    async def many() -> None:
        await asyncio.gather(*(gate.acquire_async("wx1", "refresh") for _ in range(40)))

    asyncio.run(many())
    granted = [t for t in takes if t is not None and t[0].granted]
    assert sum(t[0].granted for t in granted) >= 40
    assert len(takes) <= 2 * len(granted) + 2, [t and t[0] for t in takes]


def test_threads_and_tasks_wait_for_the_same_permits(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a quota of 5 a second, one thread and three tasks waiting at once, when permits
    come, then every caller gets one, one after another, whichever side it waits on."""
    gate = _gate(store, "5/second", threading.Event())
    takes = _count_takes(store, monkeypatch)
    got: list[float] = []

    def thread_side() -> None:
        gate.acquire("wx1", "refresh")
        got.append(time.monotonic())

    async def task_side() -> None:
        await gate.acquire_async("wx1", "refresh")
        got.append(time.monotonic())

    async def both() -> None:
        t = threading.Thread(target=thread_side)
        t.start()
        await asyncio.gather(*(task_side() for _ in range(3)))
        await asyncio.to_thread(t.join, 10)

    asyncio.run(both())
    assert len(got) == 4
    # 5 in any 1.05 s (1 s and the slack), no burst: one permit per 210 ms at most.
    granted = [t for t in takes if t is not None and t[0].granted]
    assert sum(t[0].granted for t in granted) == 4
    assert_spaced(granted, "5/second")


def test_a_task_waiting_for_a_permit_sees_a_stop(store: Store) -> None:
    """Given a task waiting 10 s for the next permit, when keeper stops, then it gives up
    within STOP_CHECK_S with Stopped, and the loop was never blocked meanwhile."""
    stop = threading.Event()
    gate = _gate(store, "1/10 seconds", stop)
    gate.acquire("wx1", "refresh")  # the only permit for 10 s

    async def waiting() -> tuple[float, int]:
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(ticking())
        caller = asyncio.create_task(gate.acquire_async("wx1", "refresh"))
        while gate._pools[("wx1", "refresh")].waiting != 1:
            await asyncio.sleep(0.01)
        stopped = time.monotonic()
        stop.set()
        with pytest.raises(Stopped):
            await caller
        ticker.cancel()
        return time.monotonic() - stopped, ticks

    took, ticks = asyncio.run(waiting())
    assert took < STOP_CHECK_S + 0.5 and ticks > 0


def test_a_database_failure_reaches_the_task_and_frees_the_asking(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a database that fails, when a task asks for a permit, then it gets the
    StoreError, and the pool is not left with a caller asking forever: once the database is
    back, the next caller gets its permit."""
    gate = _gate(store, "10/second", threading.Event())
    real = store.quota_take

    def down(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseUnavailable("connection refused")

    monkeypatch.setattr(store, "quota_take", down)
    with pytest.raises(DatabaseUnavailable):
        asyncio.run(gate.acquire_async("wx1", "refresh"))
    assert not gate._pools[("wx1", "refresh")].asking
    monkeypatch.setattr(store, "quota_take", real)
    asyncio.run(gate.acquire_async("wx1", "refresh"))


def test_permits_of_a_take_begun_before_a_pause_are_not_handed_out(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a take under way when WeChat answers 45011 (a pause), when the take comes back
    with permits, then they are not used: the caller waits for the pause instead (here,
    longer than it will wait)."""
    gate = _gate(store, "600/minute", threading.Event())
    real = store.quota_take
    paused = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        taken = real(*args, **kwargs)
        gate.pause("wx1", "refresh", 45011)  # WeChat's answer to another call, meanwhile
        paused.set()
        return taken

    monkeypatch.setattr(store, "quota_take", slow)
    with pytest.raises(QuotaWait):
        gate.acquire("wx1", "refresh", max_wait_s=5)
    assert paused.is_set() and gate._pools[("wx1", "refresh")].permits == 0


def test_a_permit_whose_answer_reached_the_task_too_late_is_not_used(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a quota of 10 a second (half its slack: 25 ms) and a loop that runs the asking
    task only 100 ms after the database answered, when the task acquires, then that permit is
    not used (its call could reach WeChat later than the quota's arithmetic allows): the task
    asks again and uses the next one."""
    gate = _gate(store, "10/second", threading.Event())
    takes = _count_takes(store, monkeypatch)
    real = asyncio.to_thread
    late = [True]

    async def slow_hop(fn: Any, *args: Any) -> Any:
        answer = await real(fn, *args)
        if late and answer is not None and answer[0].granted:  # the first grant only
            late.clear()
            await asyncio.sleep(0.1)
        return answer

    monkeypatch.setattr(asyncio, "to_thread", slow_hop)
    asyncio.run(gate.acquire_async("wx1", "refresh"))
    granted = [t for t in takes if t is not None and t[0].granted]
    assert len(granted) == 2
