"""Quota arithmetic: no window of the period ever holds more than the quota."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest

from keeper.core.quota import Gcra, Quota, parse_quota, pause_until, paused_tat_us, take

US = 1_000_000


@pytest.mark.parametrize(("text", "count", "period"), [
    ("50000/minute", 50000, 60), ("20/2 seconds", 20, 2), ("100/second", 100, 1),
    ("5/hour", 5, 3600), ("7/ 1.5 minutes", 7, 90), ("1/day", 1, 86400),
])
def test_quotas_parse(text: str, count: int, period: float) -> None:
    assert parse_quota(text) == Quota(count, period)


@pytest.mark.parametrize("text", ["", "50000", "0/minute", "10/fortnight", "-1/second", "x/s"])
def test_bad_quotas_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quota(text)


def simulate(quota: Quota, *, seconds: float, takers: int, seed: int) -> list[int]:
    """Greedy takers asking at random moments; the grant times (µs) of every permit."""
    params = Gcra.for_quota(quota)
    rng = random.Random(seed)
    tat, now = 0, 1_000 * US
    times: list[int] = []
    end = now + int(seconds * US)
    while now < end:
        decision = take(params, tat, now, rng.randint(1, takers))
        if decision.granted:
            tat = decision.new_tat_us
            times.extend([now] * decision.granted)
            now += rng.randint(0, int(params.interval_us * 2))
        else:
            now += int(decision.wait_s * US) + rng.randint(0, 50)
    return times


def max_in_window(times: list[int], window_us: int) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window_us:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.parametrize(("quota", "takers"), [
    (Quota(50000, 60), 64), (Quota(10000, 60), 32), (Quota(20, 2), 8), (Quota(3, 1), 4),
    (Quota(1, 1), 2), (Quota(2, 60), 2),
])
def test_no_window_of_the_period_plus_slack_exceeds_the_quota(quota: Quota, takers: int) -> None:
    params = Gcra.for_quota(quota)
    times = simulate(quota, seconds=quota.period_s * 4, takers=takers, seed=quota.count)
    window = int((quota.period_s + params.slack_s) * US)
    assert max_in_window(times, window) <= quota.count


@pytest.mark.parametrize("quota", [Quota(50000, 60), Quota(10000, 60), Quota(600, 60)])
def test_a_backlog_uses_nearly_all_of_a_large_quota(quota: Quota) -> None:
    times = simulate(quota, seconds=quota.period_s * 5, takers=64, seed=1)
    per_period = len(times) / 5
    assert per_period >= 0.95 * quota.count


def backlog(quota: Quota, *, takers: int, want: int, periods: int) -> list[int]:
    """``takers`` processes with a backlog share one quota: each asks for ``want`` permits,
    asks again at once when it got some, and when told to wait, asks again exactly then. The
    grant times (µs) of every permit, the clock passed in."""
    params = Gcra.for_quota(quota)
    start = 1_000 * US
    end = start + int(periods * quota.period_s * US)
    tat, times = 0, []
    asks = [start + i for i in range(takers)]  # the next moment each taker asks
    while True:
        i = min(range(takers), key=asks.__getitem__)
        now = asks[i]
        if now >= end:
            return times
        decision = take(params, tat, now, want)
        if decision.granted:
            tat = decision.new_tat_us
            times += [now] * decision.granted
        else:
            asks[i] = now + max(1, round(decision.wait_s * US))


def share_after_the_first_period(quota: Quota, times: list[int], periods: int) -> float:
    """Permits per period after the first (whose burst is spent), over the quota's count."""
    steady = [t for t in times if t >= times[0] + quota.period_s * US]
    return len(steady) / ((periods - 1) * quota.count)


@pytest.mark.parametrize("quota", [
    Quota(10, 2), Quota(20, 2), Quota(12, 60), Quota(50, 1), Quota(480, 2), Quota(600, 60),
    Quota(10000, 60), Quota(2, 1), Quota(3, 1), Quota(1, 1), Quota(5, 60),
])
@pytest.mark.parametrize("takers", [1, 3])
def test_a_backlog_gets_the_most_of_the_quota_the_promise_allows(quota: Quota,
                                                                  takers: int) -> None:
    """Every permit comes at the moment the schedule allows: under a backlog the share of the
    quota's rate is P / (P + slack) * (N - burst) / N (98.4 % for most quotas under 100), at
    least 90 % for quotas of 10 and more, and no window of P + slack holds more than N."""
    params = Gcra.for_quota(quota)
    periods = 1 + max(5, math.ceil(2000 / quota.count))  # 2,000 permits or more counted
    times = backlog(quota, takers=takers, want=params.max_take, periods=periods)
    burst = params.max_take - 1
    best = quota.period_s / (quota.period_s + params.slack_s) * (quota.count - burst) / quota.count
    share = share_after_the_first_period(quota, times, periods)
    assert best - 1 / 1000 <= share <= best + 1 / 1000  # a permit at either end
    if quota.count >= 10:
        assert share >= 0.9
    window = int((quota.period_s + params.slack_s) * US)
    assert max_in_window(times, window) <= quota.count


def test_take_waits_exactly_until_the_next_permit_fits() -> None:
    params = Gcra.for_quota(Quota(20, 2))
    first = take(params, 0, 10 * US, 1)
    assert first.granted == 1
    second = take(params, first.new_tat_us, 10 * US, 1)
    assert second.granted == 0 and second.wait_s > 0
    later = 10 * US + round(second.wait_s * US)
    assert take(params, first.new_tat_us, later, 1).granted == 1
    # Not a moment later than that: a microsecond earlier, no permit fits yet.
    assert take(params, first.new_tat_us, later - 1, 1).granted == 0


def test_a_minute_pause_lasts_until_the_next_minute() -> None:
    now = datetime(2026, 11, 1, 12, 0, 17, tzinfo=UTC)
    assert pause_until(45011, Quota(50000, 60), now) == datetime(2026, 11, 1, 12, 1, tzinfo=UTC)


def test_a_daily_pause_lasts_until_midnight_in_china() -> None:
    now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)  # 20:00 in Beijing
    assert pause_until(45009, None, now) == datetime(2026, 11, 1, 16, 0, tzinfo=UTC)


def test_a_paused_state_grants_nothing_before_the_pause_ends() -> None:
    params = Gcra.for_quota(Quota(50000, 60))
    until = datetime(2026, 11, 1, 12, 1, tzinfo=UTC)
    tat = paused_tat_us(params, until)
    just_before = int(until.timestamp() * US) - 1
    assert take(params, tat, just_before, 1).granted == 0
    assert take(params, tat, int(until.timestamp() * US) + params.interval_us, 1).granted == 1
