"""A WeChat OAuth2 simulator: a real loopback HTTP server imitating WeChat's four sns endpoints.

Keeper's tests, ``keeper demo`` and ``keeper bench`` talk to it over real HTTP, exactly as they
talk to ``api.weixin.qq.com``: every answer is HTTP 200 with a JSON body sent as ``text/plain``,
errors are ``{"errcode": N, "errmsg": "..."}``, codes are single-use, refresh tokens die after
``refresh_token_days``, quotas are per app in epoch-aligned windows, and avatar URLs stop working
once the user changes avatar. ``/_sim/*`` is an admin API so a simulator running in another
process (``keeper simulate``) can be set up and inspected.

All times are Unix seconds (floats) read from ``clock`` (``time.time`` unless a test passes
another); all durations are in seconds unless their name says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import ipaddress
import json
import random
import re
import secrets
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

ENDPOINTS: tuple[str, ...] = ("code", "refresh", "auth", "userinfo")
FAILURE_KINDS: frozenset[str] = frozenset({"-1", "502", "truncated", "timeout", "html"})
GRANT_STATES: frozenset[str] = frozenset({"ok", "revoked", "invalid", "snapshot"})
ACCESS_TOKEN_LIFETIME_S = 7200
# Avatar sizes WeChat offers; 0 means the 640x640 original.
AVATAR_SIZES: dict[int, int] = {0: 640, 46: 46, 64: 64, 96: 96, 132: 132}

_DAY_S = 86400.0
_UNQUOTED_WINDOW_S = 60.0
_UNKNOWN_APP = "-"
_PATHS: dict[str, str] = {
    "/sns/oauth2/access_token": "code",
    "/sns/oauth2/refresh_token": "refresh",
    "/sns/auth": "auth",
    "/sns/userinfo": "userinfo",
}
_ERRMSG: dict[int, str] = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40003: "invalid openid",
    40013: "invalid appid",
    40029: "invalid code",
    40030: "invalid refresh_token",
    40125: "invalid appsecret",
    40163: "code been used",
    41001: "access_token missing",
    41002: "appid missing",
    41003: "refresh_token missing",
    41004: "appsecret missing",
    41008: "missing code",
    41009: "missing openid",
    42001: "access_token expired",
    42002: "refresh_token expired",
    42003: "code expired",
    42007: "the access_token and refresh_token are invalid, user need to reauthorize",
    45011: "api minute-quota reach limit mustslow down this moment",
    48001: "api unauthorized",
}
_IMAGE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_QUOTA_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]*)\s*$")
_UNIT_S: dict[str, float] = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_HTML_404 = b"<html><head><title>404 Not Found</title></head><body>404 Not Found</body></html>\n"
_HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
    b"</h1></center><hr><center>stgw</center></body></html>\n"
)
_HTML_PAGE = (
    b"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>\xe5\xbe\xae\xe4\xbf\xa1</title>"
    b"</head><body><p>The system is busy, please try again later.</p></body></html>\n"
)


@dataclass(frozen=True)
class SimQuota:
    """At most ``count`` calls per app in each epoch-aligned window of ``period_s`` seconds."""

    count: int
    period_s: float


# WeChat's documented per-app quotas; /sns/auth has none.
DEFAULT_QUOTAS: dict[str, SimQuota] = {
    "code": SimQuota(10000, 60.0),
    "refresh": SimQuota(50000, 60.0),
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
    if not unit and amount_text:
        unit = "s"
    if unit not in _UNIT_S:
        raise ValueError(f"bad quota {text!r}: unknown unit {unit!r}")
    count = int(count_text)
    period_s = float(amount_text or 1) * _UNIT_S[unit]
    if count <= 0 or period_s <= 0:
        raise ValueError(f"bad quota {text!r}: count and period must be positive")
    return SimQuota(count, period_s)


@dataclass(slots=True, eq=False)
class _Grant:
    appid: str
    openid: str
    access_token: str
    refresh_token: str
    access_expires_at: float
    refresh_issued_at: float
    scope: str
    unionid: str | None
    state: str
    profile: dict[str, object] | None
    rotate: bool | None


@dataclass(slots=True, eq=False)
class _Code:
    appid: str
    openid: str
    scope: str
    unionid: str | None
    snapshot: bool
    expires_at: float
    used: bool = False


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
    # array('d') holds 8 bytes per arrival, a list of floats ~4x that: a long bench stays small.
    arrivals: array[float] = field(default_factory=lambda: array("d"))


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    content_type: str
    body: bytes
    stall_s: float = 0.0  # replaces the latency: a simulated timeout
    close: bool = False  # close the connection after (or, with no body, instead of) answering


def _error(errcode: int, errmsg: str | None = None) -> dict[str, object]:
    return {"errcode": errcode, "errmsg": errmsg or _ERRMSG.get(errcode, "simulated")}


def _json_body(payload: Mapping[str, object]) -> bytes:
    # WeChat sends raw UTF-8 under a charset-less text/plain: clients must decode it themselves.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _api_reply(payload: Mapping[str, object]) -> _Reply:
    return _Reply(200, "text/plain", _json_body(payload))


def _admin_reply(payload: Mapping[str, object], status: int = 200) -> _Reply:
    return _Reply(status, "application/json", json.dumps(payload).encode())


_NOT_FOUND = _Reply(404, "text/html", _HTML_404)


def _token(prefix: str) -> str:
    # Tokens come from `secrets`, not the seeded rng: a restarted simulator must never reissue
    # a token some keeper database still holds.
    return prefix + secrets.token_urlsafe(33)


def _default_image_key(openid: str) -> str:
    return hashlib.blake2b(openid.encode(), digest_size=15).hexdigest()


@functools.lru_cache(maxsize=256)
def avatar_png(image_key: str, size_px: int) -> bytes:
    """A valid ``size_px`` x ``size_px`` solid-colour PNG whose colour is derived from the key."""
    rgb = hashlib.blake2b(image_key.encode(), digest_size=3).digest()
    raw = (b"\x00" + rgb * size_px) * size_px  # filter byte 0, then one RGB row

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", size_px, size_px, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _window_maxima(arrivals: Sequence[float], period_s: float) -> tuple[int, int]:
    """(most arrivals in one epoch-aligned window, most in any half-open interval of period_s)."""
    times = sorted(arrivals)
    best_fixed = best_sliding = run = 0
    window = None
    low = 0
    for high, t in enumerate(times):
        index = int(t // period_s)
        run = run + 1 if index == window else 1
        window = index
        best_fixed = max(best_fixed, run)
        while t - times[low] >= period_s:
            low += 1
        best_sliding = max(best_sliding, high - low + 1)
    return best_fixed, best_sliding


def _normalize_answer(answer: int | str) -> int | str:
    if isinstance(answer, bool):
        raise TypeError("answer must be an errcode or a failure kind, not a bool")
    if isinstance(answer, int):
        return "-1" if answer == -1 else answer
    if answer in FAILURE_KINDS:
        return answer
    try:
        return int(answer)
    except ValueError:
        kinds = ", ".join(sorted(FAILURE_KINDS))
        raise ValueError(f"answer {answer!r} is neither an errcode nor one of {kinds}") from None


def _check_rates(rates: Mapping[str, float]) -> dict[str, float]:
    for kind, rate in rates.items():
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"failure rate for {kind!r} must be within [0, 1]")
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError("failure rates add up to more than 1")
    return {kind: float(rate) for kind, rate in rates.items() if rate > 0}


def _check_quotas(quotas: Mapping[str, SimQuota | None]) -> None:
    for endpoint in quotas:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")


class Simulator:
    """WeChat's OAuth2 endpoints on a loopback HTTP server, with knobs for every failure.

    ``latency_s`` is slept before every API and avatar answer (never inside a lock);
    ``refresh_token_days`` is the refresh-token lifetime in days; ``quotas`` maps an endpoint
    ("code", "refresh", "userinfo", "auth") to a per-app quota (default: WeChat's documented
    ones, none for auth); ``failure_rates`` maps a failure kind ("-1", "502", "truncated",
    "timeout", "html") to the probability, per API request, of answering with it;
    ``timeout_sleep_s`` is how long a "timeout" stalls before the connection is closed;
    ``seed`` seeds the random failures; ``clock`` returns Unix seconds (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        rotate_refresh_tokens: bool = False,
        refresh_token_days: float = 30.0,
        quotas: dict[str, SimQuota] | None = None,
        failure_rates: dict[str, float] | None = None,
        timeout_sleep_s: float = 5.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._host = host
        self._port = port
        self._latency_s = latency_s
        self._rotate = rotate_refresh_tokens
        self._refresh_token_days = refresh_token_days
        quotas = dict(DEFAULT_QUOTAS if quotas is None else quotas)
        _check_quotas(quotas)
        self._quotas: dict[str, SimQuota] = quotas
        self._failure_rates = _check_rates(failure_rates or {})
        self._timeout_sleep_s = timeout_sleep_s
        self._rng = random.Random(seed)
        self._clock = clock
        # One lock guards all state below; each request holds it for a few dict operations only.
        self._lock = threading.Lock()
        self._apps: dict[str, str] = {}
        self._by_access: dict[str, _Grant] = {}
        self._by_refresh: dict[str, _Grant] = {}
        self._codes: dict[str, _Code] = {}
        self._image_key: dict[str, str] = {}  # openid -> current key, "" for no avatar
        self._image_owner: dict[str, str] = {}  # key -> openid; stale once the openid moves on
        self._forced: dict[str, list[_Forced]] = {}
        # Quota windows live apart from the stats so reset_stats() cannot lift a quota.
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}
        self._counters: dict[tuple[str, str], _Counter] = {}
        self._refreshes_by_openid: dict[str, int] = {}
        self._userinfo_by_openid: dict[str, int] = {}
        self._avatars_served = 0
        self._avatars_not_found = 0
        self._codes_issued = 0
        self._logic: dict[str, Callable[[dict[str, str], float], dict[str, object]]] = {
            "code": self._exchange_code,
            "refresh": self._refresh,
            "auth": self._auth,
            "userinfo": self._userinfo,
        }
        self._lifecycle = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._serving = False
        self._url = ""

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``; valid once start() has bound the port."""
        if not self._url:
            raise RuntimeError("the simulator is not listening yet: call start()")
        return self._url

    def _bind(self) -> _Server:
        with self._lifecycle:
            if self._server is not None:
                raise RuntimeError("the simulator is already started")
            server = _Server((self._host, self._port), self)
            bound_host, bound_port = server.socket.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            self._url = f"http://{shown}:{bound_port}"
            self._server = server
            # Set before serving: stop() may only call shutdown() once serve_forever will run.
            self._serving = True
            return server

    def start(self) -> None:
        """Serve in a background daemon thread; returns once the socket is listening."""
        server = self._bind()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name="wechat-simulator", daemon=True,
        )
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in the calling thread until stop() is called from another thread."""
        server = self._bind()
        try:
            server.serve_forever(poll_interval=0.05)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent. In-flight stalls are abandoned."""
        with self._lifecycle:
            server, self._server = self._server, None
            serving, self._serving = self._serving, False
            thread, self._thread = self._thread, None
        if server is None:
            return
        if serving:
            server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    # -- set-up ------------------------------------------------------------------------------

    def add_app(self, appid: str, secret: str) -> None:
        """Register an app (or replace its secret)."""
        with self._lock:
            self._apps[appid] = secret

    def add_grant(
        self,
        *,
        appid: str,
        openid: str,
        access_token: str,
        refresh_token: str,
        access_expires_at: float,
        refresh_issued_at: float,
        scope: str = "snsapi_userinfo",
        unionid: str | None = None,
        state: str = "ok",
        profile: dict[str, object] | None = None,
        rotate: bool | None = None,
    ) -> None:
        """Make the simulator know a grant, as if the user had logged in earlier.

        ``access_expires_at`` and ``refresh_issued_at`` are Unix seconds. ``state``: "ok";
        "revoked" (42007 everywhere); "invalid" (refresh answers 40030); "snapshot" (userinfo
        answers 48001). ``rotate`` overrides the simulator-wide ``rotate_refresh_tokens``.
        """
        grant = _Grant(
            appid, openid, access_token, refresh_token, float(access_expires_at),
            float(refresh_issued_at), scope, unionid, state, profile, rotate,
        )
        if state not in GRANT_STATES:
            raise ValueError(f"unknown grant state {state!r}; expected one of {GRANT_STATES}")
        with self._lock:
            self._store_grant(grant)

    def add_grants(self, grants: Iterable[Mapping[str, Any]]) -> int:
        """Add many grants given as add_grant keyword dicts (JSON-shaped); returns how many."""
        built = [_grant_from_json(item) for item in grants]  # validate all before storing any
        with self._lock:
            for grant in built:
                self._store_grant(grant)
        return len(built)

    def _store_grant(self, grant: _Grant) -> None:
        self._by_access[grant.access_token] = grant
        self._by_refresh[grant.refresh_token] = grant
        if grant.openid not in self._image_key:
            key = _default_image_key(grant.openid)
            self._image_key[grant.openid] = key
            self._image_owner[key] = grant.openid

    def issue_code(
        self,
        *,
        appid: str,
        openid: str,
        scope: str = "snsapi_userinfo",
        unionid: str | None = None,
        snapshot: bool = False,
        ttl_s: float = 300.0,
    ) -> str:
        """A fresh login code, as WeChat would pass to the app's callback; valid for ttl_s."""
        code = secrets.token_hex(16)
        with self._lock:
            self._codes[code] = _Code(
                appid, openid, scope, unionid, snapshot, self._clock() + ttl_s
            )
            self._codes_issued += 1
        return code

    def force(
        self, endpoint: str, answer: int | str, *, count: int = 1, openid: str | None = None
    ) -> None:
        """Answer the next ``count`` requests to ``endpoint`` with ``answer``.

        ``answer`` is an errcode (``{"errcode": N, "errmsg": "simulated"}``) or a failure kind.
        With ``openid``, only requests for that user match (for refresh: the token's owner;
        for code: the code's user). Forced answers are used before random failures, in order.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
        if count < 1:
            raise ValueError("count must be at least 1")
        forced = _Forced(_normalize_answer(answer), count, openid)
        with self._lock:
            self._forced.setdefault(endpoint, []).append(forced)

    def set_avatar(self, openid: str, image_key: str | None) -> None:
        """Change a user's avatar (None or "": no avatar). The old avatar URL starts to 404."""
        key = image_key or ""
        if key and not _IMAGE_KEY_RE.match(key):
            raise ValueError(f"image_key {image_key!r} must be [A-Za-z0-9_-]+")
        with self._lock:
            self._image_key[openid] = key
            if key:
                self._image_owner[key] = openid

    def configure(
        self,
        *,
        latency_s: float | None = None,
        failure_rates: dict[str, float] | None = None,
        rotate_refresh_tokens: bool | None = None,
        quotas: Mapping[str, SimQuota | None] | None = None,
        timeout_sleep_s: float | None = None,
        refresh_token_days: float | None = None,
    ) -> None:
        """Change knobs while serving. ``quotas`` are merged (None removes an endpoint's quota);
        ``failure_rates`` replace the old ones. Changing quotas restarts the quota windows."""
        rates = None if failure_rates is None else _check_rates(failure_rates)
        if quotas is not None:
            _check_quotas(quotas)
        with self._lock:
            if latency_s is not None:
                self._latency_s = latency_s
            if rates is not None:
                self._failure_rates = rates
            if rotate_refresh_tokens is not None:
                self._rotate = rotate_refresh_tokens
            if timeout_sleep_s is not None:
                self._timeout_sleep_s = timeout_sleep_s
            if refresh_token_days is not None:
                self._refresh_token_days = refresh_token_days
            if quotas is not None:
                merged = dict(self._quotas)
                for endpoint, quota in quotas.items():
                    if quota is None:
                        merged.pop(endpoint, None)
                    else:
                        merged[endpoint] = quota
                self._quotas = merged
                self._windows.clear()

    # -- stats -------------------------------------------------------------------------------

    def stats(self, *, detail: bool = False) -> dict[str, object]:
        """What the simulator saw since start or reset_stats(); never contains token values.

        Window maxima are arrivals for one app, in the endpoint's quota period (60 s if none).
        """
        with self._lock:
            # Copy under the lock, compute outside it: sorting arrivals must not stall requests.
            rows = [
                (appid, endpoint, c.calls, c.ok, dict(c.errors), c.quota_rejected,
                 c.secret_sent, c.arrivals[:])
                for (appid, endpoint), c in self._counters.items()
            ]
            quotas = dict(self._quotas)
            result: dict[str, object] = {
                "avatars_served": self._avatars_served,
                "avatars_not_found": self._avatars_not_found,
                "codes_issued": self._codes_issued,
            }
            if detail:
                result["refreshes_by_openid"] = dict(self._refreshes_by_openid)
                result["userinfo_by_openid"] = dict(self._userinfo_by_openid)
        totals = {endpoint: _Counter() for endpoint in ENDPOINTS}
        maxima = dict.fromkeys(ENDPOINTS, (0, 0))
        per_app: dict[str, dict[str, object]] = {}
        for appid, endpoint, calls, ok, errors, rejected, secret_sent, arrivals in sorted(
            rows, key=lambda row: (row[0], row[1])
        ):
            quota = quotas.get(endpoint)
            fixed, sliding = _window_maxima(
                arrivals, quota.period_s if quota else _UNQUOTED_WINDOW_S
            )
            counter = _Counter(calls, ok, errors, rejected, secret_sent)
            per_app.setdefault(appid, {})[endpoint] = _figures(counter, quota, fixed, sliding)
            total = totals[endpoint]
            total.calls += calls
            total.ok += ok
            total.quota_rejected += rejected
            total.secret_sent += secret_sent
            for key, n in errors.items():
                total.errors[key] = total.errors.get(key, 0) + n
            best = maxima[endpoint]
            maxima[endpoint] = (max(best[0], fixed), max(best[1], sliding))
        result["endpoints"] = {
            endpoint: _figures(totals[endpoint], quotas.get(endpoint), *maxima[endpoint])
            for endpoint in ENDPOINTS
        }
        result["per_app"] = per_app
        return result

    def reset_stats(self) -> None:
        """Forget what was seen (counts, arrivals, per-openid figures); quotas keep counting."""
        with self._lock:
            self._counters.clear()
            self._refreshes_by_openid.clear()
            self._userinfo_by_openid.clear()
            self._avatars_served = self._avatars_not_found = self._codes_issued = 0

    # -- request handling (called by _Handler) -----------------------------------------------

    def _handle(self, method: str, path: str, query: str, body: bytes) -> tuple[_Reply, float]:
        """The reply and how long to sleep before sending it."""
        if path.startswith("/_sim/"):
            return self._admin(method, path, query, body), 0.0
        endpoint = _PATHS.get(path)
        if method != "GET":
            reply = _NOT_FOUND
        elif endpoint is not None:
            reply = self._api(endpoint, dict(parse_qsl(query, keep_blank_values=True)))
        elif path.startswith("/mmopen/"):
            reply = self._avatar(path)
        else:
            reply = _NOT_FOUND
        return reply, reply.stall_s or self._latency_s

    def _api(self, endpoint: str, params: dict[str, str]) -> _Reply:
        now = self._clock()
        with self._lock:
            appid, openid = self._subject(endpoint, params)
            counter = self._counters.get((appid, endpoint))
            if counter is None:
                counter = self._counters[(appid, endpoint)] = _Counter()
            counter.calls += 1
            counter.arrivals.append(now)
            if endpoint == "refresh" and "secret" in params:
                counter.secret_sent += 1
            if self._over_quota(appid, endpoint, now):
                counter.quota_rejected += 1
                return _api_reply(_error(45011))
            failure = self._pick_failure(endpoint, openid)
            payload: dict[str, object] | None = None
            if failure is None or failure in ("truncated", "timeout"):
                # The server did the work; a truncated or timed-out answer is lost on the way
                # back (so a rotated refresh token, or a consumed code, is gone for the client).
                payload = self._logic[endpoint](params, now)
            elif endpoint == "code":
                # WeChat consumes a code even when it answers -1 or a gateway page: a retry
                # gets 40163, which is why a code exchange must never be retried.
                self._consume_code(params)
            if failure is None and payload is not None:
                errcode = payload.get("errcode", 0)
                if errcode:
                    key = str(errcode)
                    counter.errors[key] = counter.errors.get(key, 0) + 1
                else:
                    counter.ok += 1
                    self._count_success(endpoint, payload)
                return _api_reply(payload)
            key = str(failure)
            counter.errors[key] = counter.errors.get(key, 0) + 1
            stall_s = self._timeout_sleep_s
        return _failure_reply(failure, payload, stall_s)

    def _subject(self, endpoint: str, params: dict[str, str]) -> tuple[str, str | None]:
        """(appid the call counts against, openid a forced answer may be aimed at)."""
        if endpoint == "code":
            code = self._codes.get(params.get("code", ""))
            return params.get("appid") or _UNKNOWN_APP, code.openid if code else None
        if endpoint == "refresh":
            grant = self._by_refresh.get(params.get("refresh_token", ""))
            return params.get("appid") or _UNKNOWN_APP, grant.openid if grant else None
        # auth and userinfo carry no appid: the token tells which app's quota they use.
        grant = self._by_access.get(params.get("access_token", ""))
        openid = params.get("openid") or (grant.openid if grant else None)
        return (grant.appid if grant else _UNKNOWN_APP), openid

    def _over_quota(self, appid: str, endpoint: str, now: float) -> bool:
        quota = self._quotas.get(endpoint)
        if quota is None:
            return False
        window = int(now // quota.period_s)
        previous = self._windows.get((appid, endpoint))
        seen = previous[1] if previous is not None and previous[0] == window else 0
        self._windows[(appid, endpoint)] = (window, seen + 1)
        return seen >= quota.count

    def _pick_failure(self, endpoint: str, openid: str | None) -> int | str | None:
        queue = self._forced.get(endpoint)
        if queue:
            for index, forced in enumerate(queue):
                if forced.openid is None or forced.openid == openid:
                    forced.remaining -= 1
                    if forced.remaining <= 0:
                        del queue[index]
                    return forced.answer
        if self._failure_rates:
            draw = self._rng.random()
            for kind, rate in self._failure_rates.items():
                if draw < rate:
                    return kind
                draw -= rate
        return None

    def _count_success(self, endpoint: str, payload: dict[str, object]) -> None:
        openid = str(payload.get("openid", ""))
        if endpoint == "refresh":
            self._refreshes_by_openid[openid] = self._refreshes_by_openid.get(openid, 0) + 1
        elif endpoint == "userinfo":
            self._userinfo_by_openid[openid] = self._userinfo_by_openid.get(openid, 0) + 1

    def _consume_code(self, params: dict[str, str]) -> None:
        code = self._codes.get(params.get("code", ""))
        if code is not None and code.appid == params.get("appid"):
            code.used = True

    def _exchange_code(self, params: dict[str, str], now: float) -> dict[str, object]:
        appid = params.get("appid")
        if not appid:
            return _error(41002)
        secret = self._apps.get(appid)
        if secret is None:
            return _error(40013)
        if not params.get("secret"):
            return _error(41004)
        if params["secret"] != secret:
            return _error(40125)
        if not params.get("code"):
            return _error(41008)
        if params.get("grant_type") != "authorization_code":
            return _error(40002)
        code = self._codes.get(params["code"])
        if code is None or code.appid != appid:
            return _error(40029)
        if code.used:
            return _error(40163)
        if now >= code.expires_at:
            return _error(42003)
        code.used = True
        grant = _Grant(
            appid, code.openid, _token("AT"), _token("RT"), now + ACCESS_TOKEN_LIFETIME_S, now,
            code.scope, code.unionid, "snapshot" if code.snapshot else "ok", None, None,
        )
        self._store_grant(grant)
        payload = self._token_payload(grant)
        if grant.unionid:
            payload["unionid"] = grant.unionid
        if code.snapshot:
            payload["is_snapshotuser"] = 1
        return payload

    def _refresh(self, params: dict[str, str], now: float) -> dict[str, object]:
        appid = params.get("appid")
        if not appid:
            return _error(41002)
        if appid not in self._apps:
            return _error(40013)
        if not params.get("refresh_token"):
            return _error(41003)
        if params.get("grant_type") != "refresh_token":
            return _error(40002)
        grant = self._by_refresh.get(params["refresh_token"])
        if grant is None or grant.appid != appid or grant.state == "invalid":
            return _error(40030)
        if grant.state == "revoked":
            return _error(42007)
        if now >= grant.refresh_issued_at + self._refresh_token_days * _DAY_S:
            return _error(42002)
        # WeChat's doc: an expired access token is replaced; a live one keeps its value and
        # only has its expiry pushed out.
        if now >= grant.access_expires_at:
            if self._by_access.get(grant.access_token) is grant:
                del self._by_access[grant.access_token]
            grant.access_token = _token("AT")
            self._by_access[grant.access_token] = grant
        grant.access_expires_at = now + ACCESS_TOKEN_LIFETIME_S
        if grant.rotate if grant.rotate is not None else self._rotate:
            if self._by_refresh.get(grant.refresh_token) is grant:
                del self._by_refresh[grant.refresh_token]
            grant.refresh_token = _token("RT")
            grant.refresh_issued_at = now
            self._by_refresh[grant.refresh_token] = grant
        return self._token_payload(grant)

    @staticmethod
    def _token_payload(grant: _Grant) -> dict[str, object]:
        return {
            "access_token": grant.access_token,
            "expires_in": ACCESS_TOKEN_LIFETIME_S,
            "refresh_token": grant.refresh_token,
            "openid": grant.openid,
            "scope": grant.scope,
        }

    def _check_access(
        self, params: dict[str, str], now: float
    ) -> tuple[_Grant | None, dict[str, object]]:
        """(grant, {}) when the access token may be used, else (None, error payload)."""
        if not params.get("access_token"):
            return None, _error(41001)
        if not params.get("openid"):
            return None, _error(41009)
        grant = self._by_access.get(params["access_token"])
        if grant is None:
            return None, _error(40001)
        if grant.openid != params["openid"]:
            return None, _error(40003)
        if grant.state == "revoked":
            return None, _error(42007)
        if now >= grant.access_expires_at:
            return None, _error(42001)
        return grant, {}

    def _auth(self, params: dict[str, str], now: float) -> dict[str, object]:
        grant, error = self._check_access(params, now)
        return _error(0, "ok") if grant is not None else error

    def _userinfo(self, params: dict[str, str], now: float) -> dict[str, object]:
        grant, error = self._check_access(params, now)
        if grant is None:
            return error
        scopes = set(grant.scope.split(","))
        # Website (QR) logins carry snsapi_login, which includes the profile.
        if not scopes & {"snsapi_userinfo", "snsapi_login"} or grant.state == "snapshot":
            return _error(48001)
        key = self._image_key.get(grant.openid, "")
        english = params.get("lang") == "en"
        payload: dict[str, object] = {
            "openid": grant.openid,
            "nickname": f"user-{grant.openid[-6:]}",
            "sex": 1,
            # zh_CN/zh_TW (the default) answer in Chinese, raw UTF-8 under text/plain.
            "province": "Guangdong" if english else "广东",
            "city": "Shenzhen" if english else "深圳",
            "country": "CN" if english else "中国",
            "headimgurl": f"{self._url}/mmopen/{key}/132" if key else "",
            "privilege": [],
        }
        if grant.unionid:
            payload["unionid"] = grant.unionid
        if grant.profile:
            payload.update(grant.profile)
        return payload

    def _avatar(self, path: str) -> _Reply:
        parts = path.split("/")  # "", "mmopen", key, size
        size = int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else -1
        key = parts[2] if len(parts) == 4 else ""
        with self._lock:
            owner = self._image_owner.get(key)
            live = size in AVATAR_SIZES and owner is not None and self._image_key[owner] == key
            if live:
                self._avatars_served += 1
            else:
                self._avatars_not_found += 1
        if not live:
            return _NOT_FOUND
        return _Reply(200, "image/png", avatar_png(key, AVATAR_SIZES[size]))

    def _admin(self, method: str, path: str, query: str, body: bytes) -> _Reply:
        route = path.removeprefix("/_sim/")
        if method == "GET" and route in ("health", "stats"):
            if route == "health":
                return _admin_reply({"ok": True})
            detail = dict(parse_qsl(query)).get("detail", "") in ("1", "true", "yes")
            return _admin_reply(self.stats(detail=detail))
        if method != "POST":
            return _admin_reply({"error": f"no {method} /_sim/{route}"}, 404)
        try:
            data = json.loads(body) if body.strip() else {}
            if not isinstance(data, dict):
                raise TypeError("the body must be a JSON object")
            return self._admin_post(route, data)
        except (KeyError, TypeError, ValueError) as exc:
            return _admin_reply({"error": f"{type(exc).__name__}: {exc}"}, 400)

    def _admin_post(self, route: str, data: dict[str, Any]) -> _Reply:
        if route == "apps":
            self.add_app(_str(data, "appid"), _str(data, "secret"))
        elif route == "grants":
            grants = data["grants"]
            if not isinstance(grants, list):
                raise TypeError("grants must be a list")
            return _admin_reply({"added": self.add_grants(grants)})
        elif route == "codes":
            code = self.issue_code(
                appid=_str(data, "appid"), openid=_str(data, "openid"),
                scope=_str(data, "scope", "snsapi_userinfo"), unionid=_opt_str(data, "unionid"),
                snapshot=bool(data.get("snapshot", False)), ttl_s=_num(data, "ttl_s", 300.0),
            )
            return _admin_reply({"code": code})
        elif route == "force":
            answer = data["answer"]
            if not isinstance(answer, int | str):
                raise TypeError("answer must be an errcode or a failure kind")
            self.force(
                _str(data, "endpoint"), answer, count=int(_num(data, "count", 1)),
                openid=_opt_str(data, "openid"),
            )
        elif route == "avatar":
            self.set_avatar(_str(data, "openid"), _opt_str(data, "image_key"))
        elif route == "config":
            self._admin_config(data)
        elif route == "reset-stats":
            self.reset_stats()
        else:
            return _admin_reply({"error": f"no POST /_sim/{route}"}, 404)
        return _admin_reply({"ok": True})

    def _admin_config(self, data: dict[str, Any]) -> None:
        quotas: dict[str, SimQuota | None] | None = None
        if data.get("quotas") is not None:
            quotas = {
                endpoint: None if text is None else parse_quota(str(text))
                for endpoint, text in dict(data["quotas"]).items()
            }
        rates = data.get("failure_rates")
        rotate = data.get("rotate_refresh_tokens")
        self.configure(
            latency_s=_opt_num(data, "latency_s"),
            failure_rates=None if rates is None else {str(k): float(v) for k, v in rates.items()},
            rotate_refresh_tokens=None if rotate is None else bool(rotate),
            quotas=quotas,
            timeout_sleep_s=_opt_num(data, "timeout_sleep_s"),
            refresh_token_days=_opt_num(data, "refresh_token_days"),
        )


def _figures(counter: _Counter, quota: SimQuota | None, fixed: int, sliding: int) -> dict[str, object]:
    return {
        "calls": counter.calls,
        "ok": counter.ok,
        "errors": dict(sorted(counter.errors.items())),
        "quota_rejected": counter.quota_rejected,
        "secret_sent": counter.secret_sent,
        "quota": quota.count if quota else None,
        "window_s": quota.period_s if quota else None,
        "max_fixed_window": fixed,
        "max_sliding_window": sliding,
    }


def _failure_reply(failure: int | str, payload: dict[str, object] | None, stall_s: float) -> _Reply:
    if isinstance(failure, int):
        return _api_reply(_error(failure, "simulated"))
    if failure == "-1":
        return _api_reply(_error(-1))
    if failure == "502":
        return _Reply(502, "text/html", _HTML_502)
    if failure == "html":
        return _Reply(200, "text/html", _HTML_PAGE)
    if failure == "timeout":
        return _Reply(0, "", b"", stall_s=stall_s, close=True)
    body = _json_body(payload or {})  # "truncated"
    return _Reply(200, "text/plain", body[: len(body) // 2])


def _str(data: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else _str(data, key)


def _opt_num(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number")
    return float(value)


def _num(data: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = _opt_num(data, key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    return value


def _grant_from_json(item: Mapping[str, Any]) -> _Grant:
    state = _str(item, "state", "ok")
    if state not in GRANT_STATES:
        raise ValueError(f"unknown grant state {state!r}")
    profile = item.get("profile")
    if profile is not None and not isinstance(profile, dict):
        raise TypeError("profile must be an object")
    rotate = item.get("rotate")
    return _Grant(
        _str(item, "appid"), _str(item, "openid"), _str(item, "access_token"),
        _str(item, "refresh_token"), _num(item, "access_expires_at"),
        _num(item, "refresh_issued_at"), _str(item, "scope", "snsapi_userinfo"),
        _opt_str(item, "unionid"), state, profile, None if rotate is None else bool(rotate),
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled "timeout" answer must not keep the process alive
    allow_reuse_address = True
    request_queue_size = 1024  # bench clients open dozens of connections at once

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), slow where DNS is absent.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client gave up (e.g. after its own timeout): nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a bench would otherwise spend itself on connects
    server_version = "WeChatSimulator/1.0"
    sys_version = ""
    # Headers and body go out in two writes; without this, Nagle plus delayed ACK adds ~40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        """Silent: a log line per request would cost more than answering it."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.send_error(400, "bad Content-Length")
            return
        body = self.rfile.read(length) if length > 0 else b""
        url = urlsplit(self.path)
        try:
            reply, delay_s = self.server.sim._handle(method, url.path, url.query, body)
        except Exception:
            traceback.print_exc()
            reply, delay_s = _admin_reply({"error": "simulator bug, see its stderr"}, 500), 0.0
        if delay_s > 0:
            time.sleep(delay_s)
        if reply.close and not reply.body:
            self.close_connection = True  # a simulated timeout: no answer at all
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if reply.close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pairs(parser: argparse.ArgumentParser, option: str, values: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            parser.error(f"{option} expects NAME=VALUE, got {value!r}")
        pairs.append((name, rest))
    return pairs


def main(argv: list[str] | None = None) -> int:
    """``keeper simulate``: serve until SIGTERM/SIGINT, after printing ``{"url": ...}``."""
    parser = argparse.ArgumentParser(
        prog="keeper simulate", description="Run the WeChat OAuth2 simulator (a test tool)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address only")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rotate", action="store_true", help="issue a new refresh token each time")
    parser.add_argument("--refresh-token-days", type=float, default=30.0)
    parser.add_argument("--quota", action="append", default=[], metavar="ENDPOINT=COUNT/PERIOD")
    parser.add_argument("--fail", action="append", default=[], metavar="KIND=RATE")
    parser.add_argument("--app", action="append", default=[], metavar="APPID=SECRET")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not _is_loopback(args.host):
        parser.error(f"--host {args.host!r} is not a loopback address: the simulator is a test tool")
    try:
        quotas = dict(DEFAULT_QUOTAS)
        for endpoint, text in _pairs(parser, "--quota", args.quota):
            if endpoint not in ENDPOINTS:
                raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
            quotas[endpoint] = parse_quota(text)
        rates = {kind: float(rate) for kind, rate in _pairs(parser, "--fail", args.fail)}
        sim = Simulator(
            host=args.host, port=args.port, latency_s=args.latency_ms / 1000.0,
            rotate_refresh_tokens=args.rotate, refresh_token_days=args.refresh_token_days,
            quotas=quotas, failure_rates=rates, seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    for appid, secret in _pairs(parser, "--app", args.app):
        sim.add_app(appid, secret)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # only a flag: the main thread does the shutting down

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sim.start()
        print(json.dumps({"url": sim.url}), flush=True)
        stop.wait()
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
