"""What the simulator's state is made of: the endpoints, failure kinds and grant states it knows,
its quotas, the records it keeps (grants, codes, forced answers, counters), and the checks on
the values a caller puts in them. Times are Unix seconds."""

from __future__ import annotations

import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keeper.wechat.simulator.answers import ODD_BY_NAME

ENDPOINTS: tuple[str, ...] = ("code", "refresh", "auth", "userinfo")
FAILURE_KINDS: frozenset[str] = frozenset({"-1", "502", "truncated", "timeout", "html"})
GRANT_STATES: frozenset[str] = frozenset({"ok", "revoked", "invalid", "snapshot"})
ACCESS_TOKEN_LIFETIME_S = 7200
# The image key /hostile/redirect-ok/ redirects to, owned by a user no grant can name.
HOSTILE_OK_KEY = "hostile-redirect-ok"
_QUOTA_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]*)\s*$")
_UNIT_S: dict[str, float] = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}


@dataclass(frozen=True)
class SimQuota:
    """At most ``count`` calls per app in each epoch-aligned window of ``period_s`` seconds."""

    count: int
    period_s: float


# WeChat's documented per-app quotas; /sns/auth has none.
DEFAULT_QUOTAS: dict[str, SimQuota] = {
    "code": SimQuota(10000, 60.0), "refresh": SimQuota(50000, 60.0),
    "userinfo": SimQuota(50000, 60.0),
}


def parse_quota(text: str) -> SimQuota:
    """Parse ``"50000/minute"``, ``"20/2 seconds"``, ``"100/second"``, ``"5/hour"``, ``"20/2"``.

    A bare number after the slash is seconds. Raises ValueError on anything else.
    """
    match = _QUOTA_RE.match(text.lower())
    if match is None:
        raise ValueError(f"bad quota {text!r}: expected COUNT/PERIOD, e.g. 50000/minute")
    count_text, amount_text, unit = match.groups()
    unit = unit or ("s" if amount_text else "")
    if unit not in _UNIT_S:
        raise ValueError(f"bad quota {text!r}: unknown unit {unit!r}")
    quota = SimQuota(int(count_text), float(amount_text or 1) * _UNIT_S[unit])
    if quota.count <= 0 or quota.period_s <= 0:
        raise ValueError(f"bad quota {text!r}: count and period must be positive")
    return quota


@dataclass(slots=True, eq=False)
class Grant:
    """One user's authorization of one app, as WeChat holds it: its live tokens and state."""

    appid: str
    openid: str
    access_token: str
    refresh_token: str
    access_expires_at: float
    refresh_issued_at: float
    scope: str = "snsapi_userinfo"
    unionid: str | None = None
    state: str = "ok"
    profile: dict[str, object] | None = None
    rotate: bool | None = None
    legacy_profile: bool = False  # answer the full pre-2021 profile (sex, province, city...)


@dataclass(slots=True, eq=False)
class Code:
    """A login code WeChat passed to an app's callback, until it is exchanged or expires."""

    appid: str
    openid: str
    scope: str
    unionid: str | None
    snapshot: bool
    expires_at: float
    legacy_profile: bool = False
    used: bool = False
    profile: dict[str, object] | None = None  # becomes the grant's profile when exchanged


@dataclass(slots=True, eq=False)
class Forced:
    """An answer queued for the next ``remaining`` calls (of ``openid`` only, unless None)."""

    answer: int | str
    remaining: int
    openid: str | None


@dataclass(slots=True, eq=False)
class Counter:
    """What one app's calls to one endpoint came to."""

    calls: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    quota_rejected: int = 0
    secret_sent: int = 0
    # 8 bytes per arrival (a list of floats costs ~4x that): a long bench stays small.
    arrivals: array[float] = field(default_factory=lambda: array("d"))


def make_grant(*, state: str = "ok", access_expires_at: float, refresh_issued_at: float,
               **fields: Any) -> Grant:
    """A grant from add_grant's keyword arguments; raises ValueError on an unknown state."""
    if state not in GRANT_STATES:
        raise ValueError(f"unknown grant state {state!r}; expected one of {sorted(GRANT_STATES)}")
    return Grant(state=state, access_expires_at=float(access_expires_at),
                 refresh_issued_at=float(refresh_issued_at), **fields)


def normalize_answer(answer: int | str) -> int | str:
    """An errcode (int), a failure kind or the name of an ODD_ANSWERS entry (str)."""
    if isinstance(answer, bool):
        raise TypeError("answer must be an errcode, a failure kind or an answer name, not a bool")
    if isinstance(answer, str) and answer in ODD_BY_NAME:
        odd = ODD_BY_NAME[answer]
        if odd.errcode is not None and odd.name == f"errcode_{odd.errcode}":
            answer = odd.errcode  # exactly what forcing the errcode serves
        else:
            return answer
    if isinstance(answer, int):
        return "-1" if answer == -1 else answer
    if answer in FAILURE_KINDS:
        return answer
    try:
        return int(answer)
    except ValueError:
        raise ValueError(f"answer {answer!r}: not an errcode, nor one of "
                         f"{sorted(FAILURE_KINDS)}, nor an ODD_ANSWERS name") from None


def check_rates(rates: Mapping[str, float]) -> dict[str, float]:
    """Failure kind -> probability, the zero ones left out; raises ValueError on bad ones."""
    if any(kind not in FAILURE_KINDS for kind in rates):
        raise ValueError(f"failure kinds are {sorted(FAILURE_KINDS)}, got {sorted(rates)}")
    if any(not 0.0 <= rate <= 1.0 for rate in rates.values()) or sum(rates.values()) > 1.0:
        raise ValueError("failure rates must be within [0, 1] and add up to at most 1")
    return {kind: float(rate) for kind, rate in rates.items() if rate > 0}


def check_every(every: int) -> int:
    """``avatar_change_every``, checked: a whole number >= 0."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"avatar_change_every must be a whole number >= 0, got {every!r}")
    return every


def check_endpoint(endpoint: str) -> str:
    """``endpoint``, checked: one of ENDPOINTS."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
    return endpoint
