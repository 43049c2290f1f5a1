"""The simulator's records (grants, codes, forced answers, counters), its quotas, and the
replies it sends: the pieces its mixins share. Times are Unix seconds."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from keeper.wechat.simulator.answers import ODD_BY_NAME
from keeper.wechat.simulator.errmsgs import errmsg, with_rid

ENDPOINTS: tuple[str, ...] = ("code", "refresh", "auth", "userinfo")
FAILURE_KINDS: frozenset[str] = frozenset({"-1", "502", "truncated", "timeout", "html"})
GRANT_STATES: frozenset[str] = frozenset({"ok", "revoked", "invalid", "snapshot"})
ACCESS_TOKEN_LIFETIME_S = 7200
AVATAR_SIZES: dict[int, int] = {0: 640, 46: 46, 64: 64, 96: 96, 132: 132}  # 0 = the original
# The image key /hostile/redirect-ok/ redirects to, owned by a user no grant can name.
HOSTILE_OK_KEY = "hostile-redirect-ok"
_HOSTILE_OK_OWNER = "\x00hostile"
_DAY_S = 86400.0
_UNQUOTED_WINDOW_S = 60.0
_UNKNOWN_APP = "-"
_PATHS = {"/sns/oauth2/access_token": "code", "/sns/oauth2/refresh_token": "refresh",
          "/sns/auth": "auth", "/sns/userinfo": "userinfo"}
_IMAGE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_QUOTA_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]*)\s*$")
_UNIT_S: dict[str, float] = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_HTML_404 = b"<html><head><title>404 Not Found</title></head><body>404 Not Found</body></html>\n"
_HTML_502 = (b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad "
             b"Gateway</h1></center><hr><center>stgw</center></body></html>\n")
_HTML_PAGE = (b"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>WeChat</title></head>"
              b"<body><p>The system is busy, please try again later.</p></body></html>\n")


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
class _Grant:
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
class _Code:
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
class _Forced:
    answer: int | str
    remaining: int
    openid: str | None


@dataclass(slots=True, eq=False)
class _Counter:
    calls: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    quota_rejected: int = 0
    secret_sent: int = 0
    # 8 bytes per arrival (a list of floats costs ~4x that): a long bench stays small.
    arrivals: array[float] = field(default_factory=lambda: array("d"))


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    content_type: str
    body: bytes
    stall_s: float = 0.0  # a simulated timeout: stall this long instead of the latency...
    close: bool = False  # ...then close the connection (without answering when body is empty)
    headers: tuple[tuple[str, str], ...] = ()  # more headers, e.g. a redirect's Location
    # A body of unknown length instead of ``body``: sent without Content-Length as the chunks
    # come, then the connection is closed.
    stream: Callable[[], Iterator[bytes]] | None = None


def _error(errcode: int, text: str | None = None) -> dict[str, object]:
    """An error body; ``_api`` appends the rid to its errmsg on the way out."""
    return {"errcode": errcode, "errmsg": text or errmsg(errcode)}


def _first_error(*checks: tuple[bool, int]) -> int:
    """The errcode of the first failed check, in WeChat's order; 0 when all pass."""
    return next((errcode for failed, errcode in checks if failed), 0)


def _json_body(payload: Mapping[str, object]) -> bytes:
    # Raw UTF-8 under a charset-less text/plain, as WeChat sends: clients must decode it as UTF-8.
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (a truncated emoji) goes out escaped
        return json.dumps(payload, separators=(",", ":")).encode()


def _api_reply(payload: Mapping[str, object]) -> _Reply:
    return _Reply(200, "text/plain", _json_body(payload))


def _admin_reply(payload: Mapping[str, object], status: int = 200) -> _Reply:
    return _Reply(status, "application/json", json.dumps(payload).encode())


_NOT_FOUND = _Reply(404, "text/html", _HTML_404)


def _token(prefix: str) -> str:
    # From `secrets`, not the seeded rng: a restarted simulator must never reissue a token that
    # some keeper database still holds.
    return prefix + secrets.token_urlsafe(33)


def _default_image_key(openid: str) -> str:
    return hashlib.blake2b(openid.encode(), digest_size=15).hexdigest()



def _normalize_answer(answer: int | str) -> int | str:
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


def _check_rates(rates: Mapping[str, float]) -> dict[str, float]:
    if any(kind not in FAILURE_KINDS for kind in rates):
        raise ValueError(f"failure kinds are {sorted(FAILURE_KINDS)}, got {sorted(rates)}")
    if any(not 0.0 <= rate <= 1.0 for rate in rates.values()) or sum(rates.values()) > 1.0:
        raise ValueError("failure rates must be within [0, 1] and add up to at most 1")
    return {kind: float(rate) for kind, rate in rates.items() if rate > 0}


def _check_every(every: int) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"avatar_change_every must be a whole number >= 0, got {every!r}")
    return every


def _check_endpoint(endpoint: str) -> str:
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
    return endpoint


def _make_grant(*, state: str = "ok", access_expires_at: float, refresh_issued_at: float,
                **fields: Any) -> _Grant:
    if state not in GRANT_STATES:
        raise ValueError(f"unknown grant state {state!r}; expected one of {sorted(GRANT_STATES)}")
    return _Grant(state=state, access_expires_at=float(access_expires_at),
                  refresh_issued_at=float(refresh_issued_at), **fields)


def _token_payload(grant: _Grant) -> dict[str, object]:
    return {"access_token": grant.access_token, "expires_in": ACCESS_TOKEN_LIFETIME_S,
            "refresh_token": grant.refresh_token, "openid": grant.openid, "scope": grant.scope}


def _failure_reply(failure: int | str, payload: Mapping[str, object], stall_s: float,
                   rid: str) -> _Reply:
    if isinstance(failure, int):
        return _api_reply(_error(failure, with_rid(errmsg(failure), rid)))
    if failure == "truncated":
        body = _json_body(payload)
        return _Reply(200, "text/plain", body[: len(body) // 2])
    return {
        "-1": _api_reply(_error(-1, with_rid(errmsg(-1), rid))),
        "502": _Reply(502, "text/html", _HTML_502),
        "html": _Reply(200, "text/html", _HTML_PAGE),
    }.get(failure) or _Reply(0, "", b"", stall_s=stall_s, close=True)  # "timeout"


