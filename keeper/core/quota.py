"""Quota arithmetic: how many calls an app may make to one endpoint, and when.

Pure code (no database, no clock): the store keeps one number per (app, endpoint), the
*theoretical arrival time* of GCRA (the generic cell rate algorithm), and asks :func:`take`
whether ``k`` more calls fit at ``now``.

Why GCRA: keeper promises that a quota of ``N/P`` is never exceeded *in any window of length
P* (a sliding window, stricter than WeChat's calendar minutes), as WeChat counts (by arrival),
by all processes together. The whole state is a single integer per (app, endpoint), updated
under a row lock or by compare-and-swap, which works the same on SQLite and PostgreSQL.

The proof, with emission interval ``T``, tolerance ``tau = burst * T`` and
``T >= (P + slack) / (N - burst)`` (:meth:`Gcra.for_quota`):

1. GCRA grants a permit at ``t`` only when ``t >= TAT - tau``, and each grant pushes ``TAT``
   out by ``T``. So any ``n`` permits granted at ``t_1 <= ... <= t_n`` satisfy
   ``t_n - t_1 >= (n - 1) * T - tau``.
2. A permit reaches WeChat between its grant and ``slack`` later (the gate hands a permit out
   at once or lets it lapse after half the slack; the request's trip takes the rest). So the
   calls WeChat counts in a window ``[a, a + P)`` were granted in ``[a - slack, a + P)``: a
   span shorter than ``L = P + slack``, so ``t_n - t_1 < L``.
3. Together: ``(n - 1) * T - tau < L``, so ``n < 1 + (L + tau) / T <= 1 + (N - burst) + burst``,
   that is ``n <= N``.

Under a backlog the permits come every ``T``, a share ``P / (P + slack) * (N - burst) / N`` of
the quota's rate. With no burst (counts under 100) that is 98.4 % (60/61) for periods from 6 s
to a minute, 96.8 % for 3 s, 95.2 % for 2 s and 93.0 % for 1 s (the slack's floor: 100 ms, or
75 ms at 1 s); the burst takes at most 1 % more. Short of the burst's share, that is the most
the promise allows when a permit may reach WeChat up to ``slack`` after its grant: a window of
``P`` by arrival may hold grants from a span of ``P + slack``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

_US = 1_000_000
_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_QUOTA_RE = re.compile(
    r"^\s*(\d+)\s*/\s*(?:(\d+(?:\.\d+)?)\s*)?(second|minute|hour|day)s?\s*$", re.IGNORECASE
)
#: The least time allowed between a permit's grant and its call's arrival at WeChat. 50 ms
#: was overrun once by 12 ms or more (a benchmark's window held 21 calls of a 20/2 s quota while
#: another benchmark kept both cores busy, docs/performance/quotas.md): 100 ms leaves room for a
#: saturated host's scheduling, at the cost of 5 % of a 2-s quota.
MIN_SLACK_S = 0.1
#: ...but never more than this share of the period: a 1-s quota keeps 93 % of its rate (75 ms),
#: not 90.9 %, which the take's own latency would push under the 90 % an operator is promised.
MAX_SLACK_SHARE = 0.075
#: WeChat's daily quota (45009) rolls at midnight, China Standard Time.
_CHINA = timezone(timedelta(hours=8))


@dataclass(frozen=True)
class Quota:
    """At most ``count`` calls in any ``period_s`` seconds."""

    count: int
    period_s: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s:g} seconds"


def parse_quota(text: str) -> Quota:
    """Parse ``"50000/minute"``, ``"20/2 seconds"``, ``"100/second"``; raise ``ValueError``."""
    m = _QUOTA_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not COUNT/PERIOD like '50000/minute' or '20/2 seconds'")
    count = int(m.group(1))
    period = float(m.group(2) or 1) * _PERIODS[m.group(3).lower()]
    if count < 1 or period <= 0:
        raise ValueError(f"{text!r}: count and period must be positive")
    return Quota(count, period)


@dataclass(frozen=True)
class Gcra:
    """GCRA parameters derived from a quota, in microseconds."""

    interval_us: int  # emission interval T
    tolerance_us: int  # tau: how far ahead of now the schedule may run
    max_take: int  # most permits one take may grant: tau / T + 1
    slack_s: float  # how long after its grant a permit may still be used
    period_us: int = 0  # the quota's period: the window permits are counted in (status page)

    @classmethod
    def for_quota(cls, quota: Quota) -> Gcra:
        """Parameters that keep every window of ``quota.period_s`` within ``quota.count``:
        ``T = (P + slack) / (N - burst)``, rounded up to a microsecond, and ``tau = burst * T``
        (the module's docstring has the proof).

        The slack is 1/60 of the period, at least 100 ms (or 7.5 % of a period shorter than
        4/3 s) and at most one second: above the
        time a request takes to reach WeChat from a busy host (a permit lapses unused after
        half of it), and at most 5 % of the quota (1/61 from a 3-second period up). The burst
        is 1 % of the count, at most 256: enough to batch database round trips at
        50,000/minute, small enough that permits one process lets lapse cost little.
        """
        floor = min(MIN_SLACK_S, quota.period_s * MAX_SLACK_SHARE)
        slack_s = min(1.0, max(floor, quota.period_s / 60))
        burst = max(0, min(256, quota.count // 100))
        interval_us = math.ceil((quota.period_s + slack_s) * _US / (quota.count - burst))
        return cls(interval_us, burst * interval_us, burst + 1, slack_s,
                   round(quota.period_s * _US))


@dataclass(frozen=True)
class Decision:
    """The answer of :func:`take`: ``granted`` permits (0 or more) and the new state, or how
    long to wait before asking again."""

    granted: int
    new_tat_us: int
    wait_s: float


def take(params: Gcra, tat_us: int, now_us: int, want: int) -> Decision:
    """Grant as many of ``want`` permits as fit at ``now_us`` (at least one, or none)."""
    base = max(tat_us, now_us)
    room = (now_us + params.tolerance_us + params.interval_us - base) // params.interval_us
    granted = max(0, min(want, params.max_take, room))
    if granted == 0:
        # room >= 1 exactly when now >= base - tau: the earliest moment one permit fits.
        wait_us = base - params.tolerance_us - now_us
        return Decision(0, tat_us, max(wait_us, 1) / _US)
    return Decision(granted, base + granted * params.interval_us, 0.0)


def window_start_us(now_us: int, period_us: int) -> int:
    """The start of the quota window holding ``now_us``: windows are aligned to multiples of
    the period since the epoch (calendar minutes for a per-minute quota, as WeChat counts)."""
    return now_us - now_us % period_us if period_us > 0 else 0


@dataclass(frozen=True)
class Usage:
    """Permits taken (by every process) in the current quota window and the one before."""

    window_start: datetime
    period_s: float
    current: int
    previous: int


def usage(window_us: int, permits: int, previous: int, now_us: int, period_us: int) -> Usage:
    """What a quota row's counters (``window_us`` with its ``permits``, and ``previous`` for
    the window before it) say at ``now_us``: a row not written in this window has taken
    nothing in it."""
    start = window_start_us(now_us, period_us)
    if window_us == start:
        current, before = permits, previous
    elif window_us == start - period_us:
        current, before = 0, permits
    else:
        current = before = 0
    return Usage(datetime.fromtimestamp(start / _US, UTC), period_us / _US, current, before)


def pause_until(errcode: int, quota: Quota | None, now: datetime) -> datetime:
    """When an endpoint answered 45011 (minute quota) or 45009 (daily quota) may be used again.

    45011 says "retry next minute": the window rolls at the next multiple of the period (one
    minute when no quota is configured). 45009 rolls at midnight in China.
    """
    if errcode == 45009:
        local = now.astimezone(_CHINA)
        midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight.astimezone(UTC)
    period = quota.period_s if quota else 60.0
    ts = now.timestamp()
    return datetime.fromtimestamp((math.floor(ts / period) + 1) * period, UTC)


def paused_tat_us(params: Gcra, until: datetime) -> int:
    """The state that admits no permit before ``until``."""
    return int(until.timestamp() * _US) + params.tolerance_us
