"""The re-login forecast: how many live grants reach the end of their refresh token's lifetime
on each of the coming days (China Standard Time dates, as WeChat's users live them).

Pure arithmetic over counts the store gives per day; the day a lifetime ends is
``refresh_issued_at + refresh_token_days``. A grant still ``active`` is refreshed on its
refresh day and lapses then only if WeChat does not renew it; an ``expiring`` one WeChat has
already declined to renew (the same refresh token came back): it lapses that day unless the
user logs in again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone

#: China Standard Time (no daylight saving: every day is 86,400 s).
CHINA = timezone(timedelta(hours=8), "CST")
MAX_DAYS = 3650


@dataclass(frozen=True)
class Day:
    """One day of the forecast: live grants whose lifetime ends that day, and how many of them
    WeChat has already declined to renew (``expiring``)."""

    date: date
    lapsing: int
    expiring: int


def china_today(now: datetime) -> date:
    """The date in China at ``now`` (an aware datetime)."""
    return now.astimezone(CHINA).date()


def day_start(day: date) -> datetime:
    """Midnight of ``day`` in China, as an aware UTC datetime."""
    return datetime.combine(day, time(0), CHINA).astimezone(UTC)


def days_of(today: date, days: int,
            counts: Iterable[Mapping[int, tuple[int, int]]]) -> list[Day]:
    """``days`` days from ``today``, zeros included, summing each app's ``{day number:
    (lapsing, expiring)}``."""
    total = [[0, 0] for _ in range(days)]
    for per_app in counts:
        for d, (lapsing, expiring) in per_app.items():
            if 0 <= d < days:
                total[d][0] += lapsing
                total[d][1] += expiring
    return [Day(today + timedelta(days=d), n, e) for d, (n, e) in enumerate(total)]
