"""The quota gate on a real store: callers waiting for room do not each ask the database, and a
stop reaches a caller that waits."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest

from keeper.config import AppConfig
from keeper.core.quota import parse_quota
from keeper.limiter import STOP_CHECK_S, QuotaGate, Stopped
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
    got.sort()
    # The quota held: 10 in any 1 s, with no burst, is one permit per 113 ms at most.
    assert all(b - a > 0.1 for a, b in itertools.pairwise(got)), got


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
