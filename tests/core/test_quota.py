"""Quota arithmetic: no window of the period ever holds more than the quota."""

from __future__ import annotations

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


def test_take_waits_exactly_until_the_next_permit_fits() -> None:
    params = Gcra.for_quota(Quota(20, 2))
    first = take(params, 0, 10 * US, 1)
    assert first.granted == 1
    second = take(params, first.new_tat_us, 10 * US, 1)
    assert second.granted == 0 and second.wait_s > 0
    later = 10 * US + int(second.wait_s * US)
    assert take(params, first.new_tat_us, later, 1).granted == 1


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
