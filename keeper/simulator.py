"""A WeChat OAuth2 simulator: a real loopback HTTP server imitating WeChat's four sns endpoints.

Keeper's tests, ``keeper demo`` and ``keeper bench`` talk to it over real HTTP as they talk to
``api.weixin.qq.com``: every answer is HTTP 200 with a JSON body sent as charset-less
``text/plain``, errors are ``{"errcode": N, "errmsg": "..."}``, codes are single-use, refresh
tokens die after ``refresh_token_days``, quotas are per app in epoch-aligned windows, and an
avatar URL stops working once its user changes avatar (which ``avatar_change_every`` can make
happen on its own). ``/hostile/<kind>/...`` serves avatars no client should accept (an endless
body, a bomb, redirect loops, lying content types...: see ``HOSTILE_KINDS``); ``set_avatar_url``
points a user's ``headimgurl`` at one. ``/_sim/*`` is a JSON admin API, so a simulator in another
process (``keeper simulate``) can be set up and inspected.

Times are Unix seconds read from ``clock`` (``time.time`` unless a test passes another);
durations are seconds unless their name says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import random
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from keeper.sim_answers import (
    ODD_ANSWERS,
    ODD_BY_NAME,
    OddAnswer,
    describe,
    errmsg,
    make_rid,
    unionid_field,
    with_rid,
)
from keeper.sim_images import (
    GIF_1X1,
    JPEG_1X1,
    PNG_SIGNATURE,
    WEBP_1X1,
    avatar_png,
    bomb_png,
)

ENDPOINTS: tuple[str, ...] = ("code", "refresh", "auth", "userinfo")
FAILURE_KINDS: frozenset[str] = frozenset({"-1", "502", "truncated", "timeout", "html"})
GRANT_STATES: frozenset[str] = frozenset({"ok", "revoked", "invalid", "snapshot"})
ACCESS_TOKEN_LIFETIME_S = 7200
AVATAR_SIZES: dict[int, int] = {0: 640, 46: 46, 64: 64, 96: 96, 132: 132}  # 0 = the original
HOSTILE_KINDS: tuple[str, ...] = (
    "endless", "html", "redirect-out", "redirect-loop", "redirect-ok", "truncated", "bomb",
    "gif", "webp", "jpeg", "slow",
)
HOSTILE_SLOW_S = 5.0  # how long /hostile/slow/ waits before answering (read per request)
HOSTILE_ENDLESS_MAX_BYTES = 64 * 1024 * 1024  # where /hostile/endless/ gives up all the same
HOSTILE_REDIRECT_OUT = "http://evil.example.invalid/x.png"
# The image key /hostile/redirect-ok/ redirects to, owned by a user no grant can name.
HOSTILE_OK_KEY = "hostile-redirect-ok"
_HOSTILE_OK_OWNER = "\x00hostile"
_ENDLESS_CHUNK = 64 * 1024
_ENDLESS_WRITE_TIMEOUT_S = 10.0  # a client that neither reads nor hangs up is given up on
_DAY_S = 86400.0
_UNQUOTED_WINDOW_S = 60.0
_UNKNOWN_APP = "-"
_PATHS = {"/sns/oauth2/access_token": "code", "/sns/oauth2/refresh_token": "refresh",
          "/sns/auth": "auth", "/sns/userinfo": "userinfo"}
_IMAGE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_HOP_RE = re.compile(r"[0-9]{1,9}")
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


def _window_maxima(arrivals: Sequence[float], period_s: float) -> tuple[int, int]:
    """(most arrivals in one epoch-aligned window, most in any half-open period_s interval)."""
    times = sorted(arrivals)
    best_fixed = best_sliding = run = low = 0
    window = None
    for high, t in enumerate(times):
        index = int(t // period_s)
        run, window = (run + 1 if index == window else 1), index
        best_fixed = max(best_fixed, run)
        while t - times[low] >= period_s:
            low += 1
        best_sliding = max(best_sliding, high - low + 1)
    return best_fixed, best_sliding


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


class Simulator:
    """WeChat's OAuth2 endpoints on a loopback HTTP server, with knobs for every failure.

    ``latency_s``: slept before every API, avatar and hostile answer (outside any lock).
    ``refresh_token_days``: refresh-token lifetime, in days. ``quotas``: per-app quota by
    endpoint ("code", "refresh", "userinfo", "auth"); default WeChat's documented ones, none
    for auth. ``failure_rates``: failure kind ("-1", "502", "truncated", "timeout", "html") ->
    probability per API request. ``timeout_sleep_s``: how long a "timeout" stalls before the
    connection is closed. ``seed``: seeds the random failures. ``clock``: returns Unix seconds.
    ``avatar_change_every``: when N > 0, a user changes avatar (gets a new image key, the old
    URL 404s) just before every Nth successful userinfo answer about them; 0 = never.
    ``legacy_profiles``: every user's profile is the full pre-2021 one (sex 1, a province, city
    and country) instead of today's common case (sex 0, region fields empty); per user, pass
    ``legacy_profile=True`` to add_grant or issue_code.

    As WeChat does today: every error's errmsg ends in ``, rid: <hex>-<hex>-<hex>``; a code's
    scope is ``snsapi_login`` (a website's QR login) unless given; a newer grant of the same
    user in the same app (a code exchange, or add_grant) replaces the older one's tokens, so the
    older refresh token answers 40030. ``script()`` serves a user the odd answers of
    ``keeper.sim_answers.ODD_ANSWERS`` (or any errcode) on chosen endpoints.

    Avatar (``/mmopen/``) and hostile (``/hostile/``) requests are not API calls: they are
    neither counted in the endpoint figures nor ever given a forced or random failure.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0,
                 rotate_refresh_tokens: bool = False, refresh_token_days: float = 30.0,
                 quotas: dict[str, SimQuota] | None = None,
                 failure_rates: dict[str, float] | None = None, timeout_sleep_s: float = 5.0,
                 seed: int | None = None, clock: Callable[[], float] = time.time,
                 avatar_change_every: int = 0, legacy_profiles: bool = False) -> None:
        self._address = (host, port)
        self._latency_s = latency_s
        self._rotate = rotate_refresh_tokens
        self._refresh_token_days = refresh_token_days
        self._quotas = dict(DEFAULT_QUOTAS if quotas is None else quotas)
        for endpoint in self._quotas:
            _check_endpoint(endpoint)
        self._failure_rates = _check_rates(failure_rates or {})
        self._timeout_sleep_s = timeout_sleep_s
        self._avatar_change_every = _check_every(avatar_change_every)
        self._rng = random.Random(seed)
        # Apart from _rng, so that rids do not shift the seeded sequence of random failures.
        self._rid_rng = random.Random(None if seed is None else seed + 1)
        self._clock = clock
        self._legacy_profiles = legacy_profiles
        # One lock guards the state below; a request holds it for a few dict operations only.
        self._lock = threading.Lock()
        self._apps: dict[str, str] = {}
        self._by_access: dict[str, _Grant] = {}
        self._by_refresh: dict[str, _Grant] = {}
        self._by_user: dict[tuple[str, str], _Grant] = {}  # (appid, openid) -> the latest grant
        self._codes: dict[str, _Code] = {}
        self._image_key: dict[str, str] = {}  # openid -> current key, "" for no avatar
        self._image_owner: dict[str, str] = {}  # key -> openid; stale once that user moves on
        self._image_key[_HOSTILE_OK_OWNER] = HOSTILE_OK_KEY  # where redirect-ok leads
        self._image_owner[HOSTILE_OK_KEY] = _HOSTILE_OK_OWNER
        self._avatar_urls: dict[str, str] = {}  # openid -> headimgurl set by set_avatar_url
        # openid -> successful userinfo answers since avatar_change_every was last set.
        self._profile_reads: dict[str, int] = {}
        self._forced: dict[str, list[_Forced]] = {}
        # Apart from the stats, so that reset_stats() cannot lift a quota.
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}
        self._counters: dict[tuple[str, str], _Counter] = {}
        self._by_openid: dict[str, dict[str, int]] = {"refresh": {}, "userinfo": {}}
        self._avatars = {"served": 0, "not_found": 0}
        self._avatar_downloads: dict[str, int] = {}  # image key -> avatars served
        self._hostile: dict[str, int] = {}  # kind -> requests
        self._scripted: dict[str, int] = {}  # ODD_ANSWERS name -> times served
        self._codes_issued = 0
        self._logic: dict[str, Callable[[dict[str, str], float], dict[str, object]]] = {
            "code": self._exchange_code, "refresh": self._refresh, "auth": self._auth,
            "userinfo": self._userinfo,
        }
        self._lifecycle = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
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
            self._server = _Server(self._address, self)
            host, port = self._server.socket.getsockname()[:2]
            self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            return self._server

    def start(self) -> None:
        """Serve in a background daemon thread; returns once the socket is listening."""
        server = self._bind()
        # A short poll interval: stop() waits for the loop to notice, once per test.
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        name="wechat-simulator", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in the calling thread until stop() is called from another thread."""
        server = self._bind()
        try:
            server.serve_forever(0.05)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent. Stalled answers are abandoned."""
        with self._lifecycle:
            server, self._server, thread, self._thread = self._server, None, self._thread, None
        if server is not None:
            server.stopping.set()
            # Every bound server is (about to be) serving, so shutdown() cannot wait forever.
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    # -- set-up ------------------------------------------------------------------------------

    def add_app(self, appid: str, secret: str) -> None:
        """Register an app (or replace its secret)."""
        with self._lock:
            self._apps[appid] = secret

    def add_grant(self, *, appid: str, openid: str, access_token: str, refresh_token: str,
                  access_expires_at: float, refresh_issued_at: float,
                  scope: str = "snsapi_userinfo", unionid: str | None = None, state: str = "ok",
                  profile: dict[str, object] | None = None, rotate: bool | None = None,
                  legacy_profile: bool = False) -> None:
        """Make the simulator know a grant, as if the user had logged in earlier.

        ``access_expires_at`` and ``refresh_issued_at`` are Unix seconds. ``state``: "ok",
        "revoked" (42007 everywhere), "invalid" (refresh answers 40030) or "snapshot" (userinfo
        answers 48001). ``rotate`` overrides the simulator-wide ``rotate_refresh_tokens``.
        ``profile`` fields are merged over the default profile (sex 0, empty region fields);
        ``legacy_profile``: the default is the full pre-2021 profile instead. A grant of the
        same user in the same app that the simulator already knows is replaced: its tokens die.
        """
        self.add_grants([{
            "appid": appid, "openid": openid, "access_token": access_token,
            "refresh_token": refresh_token, "access_expires_at": access_expires_at,
            "refresh_issued_at": refresh_issued_at, "scope": scope, "unionid": unionid,
            "state": state, "profile": profile, "rotate": rotate,
            "legacy_profile": legacy_profile,
        }])

    def add_grants(self, grants: Iterable[Mapping[str, Any]]) -> int:
        """Add grants given as add_grant keyword dicts (JSON-shaped); returns how many."""
        built = [_make_grant(**item) for item in grants]  # all valid before any is stored
        with self._lock:
            for grant in built:
                self._store_grant(grant)
        return len(built)

    def _store_grant(self, grant: _Grant) -> None:
        older = self._by_user.get((grant.appid, grant.openid))
        if older is not None and older is not grant:
            self._forget_tokens(older)
        self._by_user[(grant.appid, grant.openid)] = grant
        self._by_access[grant.access_token] = grant
        self._by_refresh[grant.refresh_token] = grant
        if grant.openid not in self._image_key:
            key = _default_image_key(grant.openid)
            self._image_key[grant.openid], self._image_owner[key] = key, grant.openid

    def _forget_tokens(self, grant: _Grant) -> None:
        """The grant's tokens stop working (lock held): 40001 and 40030 from now on."""
        if self._by_access.get(grant.access_token) is grant:
            del self._by_access[grant.access_token]
        if self._by_refresh.get(grant.refresh_token) is grant:
            del self._by_refresh[grant.refresh_token]

    def current_tokens(self) -> dict[str, tuple[str, str]]:
        """openid → (access token, refresh token) as WeChat holds them now: what a keeper
        that lost nothing has stored."""
        with self._lock:
            return {g.openid: (g.access_token, g.refresh_token)
                    for g in self._by_refresh.values()}

    def issue_code(self, *, appid: str, openid: str, scope: str = "snsapi_login",
                   unionid: str | None = None, snapshot: bool = False,
                   ttl_s: float = 300.0, legacy_profile: bool = False) -> str:
        """A fresh login code, as WeChat passes to the app's callback; usable for ttl_s.

        ``scope`` defaults to ``snsapi_login``, what a website's QR login grants (an Official
        Account page grants ``snsapi_base`` or ``snsapi_userinfo``). Exchanging the code when
        the simulator already holds a grant of this user in this app replaces that grant's
        tokens (its old refresh token then answers 40030), as a new authorization does.
        """
        code = secrets.token_hex(16)
        with self._lock:
            self._codes[code] = _Code(appid, openid, scope, unionid, snapshot,
                                      self._clock() + ttl_s, legacy_profile)
            self._codes_issued += 1
        return code

    def force(self, endpoint: str, answer: int | str, *, count: int = 1,
              openid: str | None = None) -> None:
        """Answer the next ``count`` requests to ``endpoint`` with ``answer``.

        ``answer`` is an errcode (sent as ``{"errcode": N, "errmsg": "<WeChat's text>, rid:
        …"}``), a failure kind, or the name of an ``ODD_ANSWERS`` entry (see script()). With
        ``openid``, only that user's requests match (refresh: the token's owner; code: the
        code's user; auth and userinfo: the openid asked about). Forced answers come before
        random failures, first queued first used.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        forced = _Forced(_normalize_answer(answer), count, openid)
        odd = ODD_BY_NAME.get(forced.answer) if isinstance(forced.answer, str) else None
        if odd is not None and endpoint not in odd.endpoints:
            raise ValueError(f"answer {odd.name!r} is for {odd.endpoints}, not {endpoint!r}")
        with self._lock:
            self._forced.setdefault(_check_endpoint(endpoint), []).append(forced)

    def script(self, openid: str, endpoint: str, answer: int | str, *, count: int = 1) -> None:
        """Answer ``openid``'s next ``count`` calls to ``endpoint`` with ``answer``.

        ``answer``: an ``ODD_ANSWERS`` name (e.g. ``"profile_control_chars"``,
        ``"tokens_application_json"``, ``"errcode_40030"``), any errcode (``40030``, ``-1``,
        ``99999``: WeChat's errmsg with a rid) or a failure kind (``"502"``, ``"timeout"``...).
        An entry that ``perform``s does the real work first (the code is consumed, the refresh
        done and the token rotated if rotation is on) and dresses its result; when that work
        fails (e.g. the token is dead), the real error is the answer. Same as
        ``force(endpoint, answer, count=count, openid=openid)``.
        """
        self.force(endpoint, answer, count=count, openid=openid)

    def set_avatar(self, openid: str, image_key: str | None) -> None:
        """Change a user's avatar (None or "": no avatar); the old avatar URL starts to 404.

        Also ends a set_avatar_url override: the user's headimgurl is the simulator's again.
        """
        if image_key and not _IMAGE_KEY_RE.match(image_key):
            raise ValueError(f"image_key {image_key!r} must match [A-Za-z0-9_-]+")
        with self._lock:
            self._image_key[openid] = image_key or ""
            if image_key:
                self._image_owner[image_key] = openid
            self._avatar_urls.pop(openid, None)

    def set_avatar_url(self, openid: str, url: str) -> None:
        """Make userinfo answer ``url`` as the user's headimgurl, until set_avatar is called.

        Any string goes (e.g. ``hostile_url("endless")``, a foreign host, "" or not a URL at
        all). A ``headimgurl`` in the grant's ``profile`` still wins over it. The user's own
        image key stays live and still changes with ``avatar_change_every``, unseen meanwhile.
        """
        if not isinstance(url, str):
            raise TypeError(f"url must be a string, got {type(url).__name__}")
        with self._lock:
            self._avatar_urls[openid] = url

    def hostile_url(self, kind: str) -> str:
        """The URL of a hostile avatar of this ``kind`` (one of ``HOSTILE_KINDS``)."""
        if kind not in HOSTILE_KINDS:
            raise ValueError(f"unknown hostile kind {kind!r}; expected one of {HOSTILE_KINDS}")
        return f"{self.url}/hostile/{kind}/a.png"

    def configure(self, *, latency_s: float | None = None,
                  failure_rates: dict[str, float] | None = None,
                  rotate_refresh_tokens: bool | None = None,
                  quotas: Mapping[str, SimQuota | None] | None = None,
                  avatar_change_every: int | None = None,
                  legacy_profiles: bool | None = None) -> None:
        """Change knobs while serving; None leaves one as it is. ``failure_rates`` replace the
        old ones; ``quotas`` are merged (a None quota removes it) and restart the windows;
        ``avatar_change_every`` restarts each user's count of profile reads."""
        rates = None if failure_rates is None else _check_rates(failure_rates)
        every = None if avatar_change_every is None else _check_every(avatar_change_every)
        for endpoint in quotas or {}:
            _check_endpoint(endpoint)  # all checked before any is applied
        with self._lock:
            self._latency_s = self._latency_s if latency_s is None else latency_s
            self._failure_rates = self._failure_rates if rates is None else rates
            if rotate_refresh_tokens is not None:
                self._rotate = rotate_refresh_tokens
            if legacy_profiles is not None:
                self._legacy_profiles = legacy_profiles
            if every is not None:
                self._avatar_change_every = every
                self._profile_reads.clear()
            for endpoint, quota in (quotas or {}).items():
                self._quotas.pop(endpoint, None)
                if quota is not None:
                    self._quotas[endpoint] = quota
                self._windows.clear()

    # -- stats -------------------------------------------------------------------------------

    def stats(self, *, detail: bool = False) -> dict[str, object]:
        """What the simulator saw since start or reset_stats(); never holds token values.

        Window maxima count one app's arrivals within the endpoint's quota period (else 60 s).
        Calls naming no known app (auth/userinfo with an unknown token) count under app "-".
        """
        with self._lock:
            # Copy under the lock, compute outside it: sorting arrivals must not stall requests.
            rows = [(appid, endpoint, _Counter(c.calls, c.ok, dict(c.errors), c.quota_rejected,
                                               c.secret_sent, c.arrivals[:]))
                    for (appid, endpoint), c in sorted(self._counters.items())]
            quotas = dict(self._quotas)
            result: dict[str, object] = {
                "avatars_served": self._avatars["served"],
                "avatars_not_found": self._avatars["not_found"],
                "hostile_requests": dict(sorted(self._hostile.items())),
                "codes_issued": self._codes_issued,
                "scripted_served": dict(sorted(self._scripted.items())),
            }
            if detail:
                result["refreshes_by_openid"] = dict(self._by_openid["refresh"])
                result["userinfo_by_openid"] = dict(self._by_openid["userinfo"])
                result["avatar_downloads_by_key"] = dict(self._avatar_downloads)
        totals = {endpoint: _Counter() for endpoint in ENDPOINTS}
        maxima = dict.fromkeys(ENDPOINTS, (0, 0))
        per_app: dict[str, dict[str, object]] = {}
        for appid, endpoint, counter in rows:
            quota = quotas.get(endpoint)
            fixed, sliding = _window_maxima(counter.arrivals,
                                            quota.period_s if quota else _UNQUOTED_WINDOW_S)
            per_app.setdefault(appid, {})[endpoint] = _figures(counter, quota, fixed, sliding)
            total = totals[endpoint]
            total.calls += counter.calls
            total.ok += counter.ok
            total.quota_rejected += counter.quota_rejected
            total.secret_sent += counter.secret_sent
            for key, n in counter.errors.items():
                total.errors[key] = total.errors.get(key, 0) + n
            maxima[endpoint] = (max(maxima[endpoint][0], fixed), max(maxima[endpoint][1], sliding))
        result["endpoints"] = {
            endpoint: _figures(totals[endpoint], quotas.get(endpoint), *maxima[endpoint])
            for endpoint in ENDPOINTS
        }
        result["per_app"] = per_app
        return result

    def reset_stats(self) -> None:
        """Forget what was seen (counts, arrivals, per-openid figures); quotas keep counting,
        and so do the profile reads that avatar_change_every counts."""
        with self._lock:
            self._counters.clear()
            for by_openid in self._by_openid.values():
                by_openid.clear()
            self._avatars = {"served": 0, "not_found": 0}
            self._avatar_downloads.clear()
            self._hostile.clear()
            self._scripted.clear()
            self._codes_issued = 0

    # -- request handling (called by _Handler) -----------------------------------------------

    def _handle(self, method: str, path: str, query: str, body: bytes) -> tuple[_Reply, float]:
        """The reply, and how long to sleep before sending it."""
        if path.startswith("/_sim/"):
            return self._admin(method, path.removeprefix("/_sim/"), query, body), 0.0
        endpoint = _PATHS.get(path)
        if method == "GET" and endpoint is not None:
            reply = self._api(endpoint, dict(parse_qsl(query, keep_blank_values=True)))
        elif method == "GET" and path.startswith("/mmopen/"):
            reply = self._avatar(path)
        elif method == "GET" and path.startswith("/hostile/"):
            reply = self._hostile_reply(path)
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
                counter.secret_sent += 1  # WeChat's refresh takes no secret: sending it leaks it
            if self._over_quota(appid, endpoint, now):
                counter.quota_rejected += 1
                return self._reply(_error(45011), now)
            failure = self._pick_failure(endpoint, openid)
            if isinstance(failure, str) and failure in ODD_BY_NAME:
                return self._odd(endpoint, ODD_BY_NAME[failure], params, now, counter)
            if failure is None:
                payload = self._perform(endpoint, params, now)
                self._count(endpoint, counter, payload)
                return self._reply(payload, now)
            counter.errors[str(failure)] = counter.errors.get(str(failure), 0) + 1
            if failure in ("truncated", "timeout"):
                # The server did the work and the answer got lost on the way back: a rotated
                # refresh token or a consumed code is gone for the client, as with WeChat.
                return _failure_reply(failure, self._logic[endpoint](params, now),
                                      self._timeout_sleep_s, "")
            if endpoint == "code" and isinstance(failure, str):
                self._consume_code(params)
            rid = make_rid(now, self._rid_rng)
        return _failure_reply(failure, {}, 0.0, rid)

    def _perform(self, endpoint: str, params: dict[str, str], now: float) -> dict[str, object]:
        """The real answer to a call that reaches the client (lock held)."""
        if endpoint == "userinfo":
            return self._userinfo(params, now, answered=True)
        return self._logic[endpoint](params, now)

    def _count(self, endpoint: str, counter: _Counter, payload: Mapping[str, object]) -> None:
        outcome = str(payload.get("errcode") or "")
        if outcome:
            counter.errors[outcome] = counter.errors.get(outcome, 0) + 1
            return
        by_openid = self._by_openid.get(endpoint)
        if by_openid is not None:
            user = str(payload["openid"])
            by_openid[user] = by_openid.get(user, 0) + 1
        counter.ok += 1

    def _reply(self, payload: dict[str, object], now: float) -> _Reply:
        """The API answer; an error's errmsg gets a rid, as WeChat's do today (lock held)."""
        if payload.get("errcode"):
            payload["errmsg"] = with_rid(str(payload.get("errmsg", "")),
                                         make_rid(now, self._rid_rng))
        return _api_reply(payload)

    def _consume_code(self, params: dict[str, str]) -> None:
        # WeChat consumes a code even when it answers -1 (a retry gets 40163): this is why a
        # code exchange must never be retried.
        code = self._codes.get(params.get("code", ""))
        if code is not None and code.appid == params.get("appid"):
            code.used = True

    def _odd(self, endpoint: str, odd: OddAnswer, params: dict[str, str], now: float,
             counter: _Counter) -> _Reply:
        """A scripted ODD_ANSWERS entry (lock held): performed first when it says so, then its
        body, placeholders filled from the result (or from the state as it stands)."""
        self._scripted[odd.name] = self._scripted.get(odd.name, 0) + 1
        values = {"rid": make_rid(now, self._rid_rng), "other_openid": "o" + secrets.token_hex(14),
                  "fake_access_token": _token("AT"), "fake_refresh_token": _token("RT"),
                  "expires_in": str(ACCESS_TOKEN_LIFETIME_S), "is_snapshotuser": "0"}
        if odd.perform:
            payload = self._perform(endpoint, params, now)
            self._count(endpoint, counter, payload)
            if payload.get("errcode"):
                return self._reply(payload, now)  # nothing to dress: the real error it is
            values.update({key: str(value) for key, value in payload.items()
                           if isinstance(value, str | int) and not isinstance(value, bool)})
            values["unionid_field"] = unionid_field(str(payload.get("unionid") or "") or None)
        else:
            key = odd.name if odd.errcode is None else str(odd.errcode)
            counter.errors[key] = counter.errors.get(key, 0) + 1
            values.update(self._as_it_stands(endpoint, params))
        return _Reply(200, odd.content_type, odd.render(values))

    def _as_it_stands(self, endpoint: str, params: dict[str, str]) -> dict[str, str]:
        """Placeholder values for an answer that changes nothing (lock held): the asker's
        tokens as they are (tokens never issued for a code, which is consumed)."""
        grant: _Grant | None = None
        if endpoint == "code":
            self._consume_code(params)
            code = self._codes.get(params.get("code", ""))
            return {"openid": code.openid if code else "", "scope": code.scope if code else "",
                    "unionid_field": unionid_field(code.unionid if code else None),
                    "access_token": _token("AT"), "refresh_token": _token("RT"),
                    "headimgurl": ""}
        if endpoint == "refresh":
            grant = self._by_refresh.get(params.get("refresh_token", ""))
        else:
            grant = self._by_access.get(params.get("access_token", ""))
        openid = grant.openid if grant else params.get("openid", "")
        return {"openid": openid, "scope": grant.scope if grant else "",
                "unionid_field": unionid_field(grant.unionid if grant else None),
                "access_token": grant.access_token if grant else params.get("access_token", ""),
                "refresh_token": (grant.refresh_token if grant
                                  else params.get("refresh_token", "")),
                "headimgurl": self._headimgurl(openid)}

    def _subject(self, endpoint: str, params: dict[str, str]) -> tuple[str, str | None]:
        """(the app the call counts against, the user a forced answer may be aimed at)."""
        if endpoint == "code":
            code = self._codes.get(params.get("code", ""))
            return params.get("appid") or _UNKNOWN_APP, code.openid if code else None
        if endpoint == "refresh":
            grant = self._by_refresh.get(params.get("refresh_token", ""))
            return params.get("appid") or _UNKNOWN_APP, grant.openid if grant else None
        # auth and userinfo carry no appid: the token tells whose quota they use.
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

    def _exchange_code(self, params: dict[str, str], now: float) -> dict[str, object]:
        appid, secret = params.get("appid", ""), self._apps.get(params.get("appid", ""))
        code = self._codes.get(params.get("code") or "")
        errcode = _first_error(
            (not appid, 41002), (secret is None, 40013), (not params.get("secret"), 41004),
            (params.get("secret") != secret, 40125), (not params.get("code"), 41008),
            (params.get("grant_type") != "authorization_code", 40002),
            (code is None or code.appid != appid, 40029),
            (code is not None and code.used, 40163),
            (code is not None and now >= code.expires_at, 42003),
        )
        if errcode or code is None:
            return _error(errcode)
        code.used = True
        grant = self._by_user.get((appid, code.openid))
        if grant is None:
            grant = _Grant(appid, code.openid, "", "", 0.0, 0.0,
                           legacy_profile=code.legacy_profile)
        else:
            # A new authorization of a user WeChat knows: the older tokens die with it (the
            # older refresh token then answers 40030); the user's profile stays theirs.
            self._forget_tokens(grant)
            grant.legacy_profile = grant.legacy_profile or code.legacy_profile
        grant.access_token, grant.refresh_token = _token("AT"), _token("RT")
        grant.access_expires_at, grant.refresh_issued_at = now + ACCESS_TOKEN_LIFETIME_S, now
        grant.scope, grant.unionid = code.scope, code.unionid
        grant.state = "snapshot" if code.snapshot else "ok"
        self._store_grant(grant)
        payload = _token_payload(grant)
        if grant.unionid:
            payload["unionid"] = grant.unionid
        if code.snapshot:
            payload["is_snapshotuser"] = 1
        return payload

    def _refresh(self, params: dict[str, str], now: float) -> dict[str, object]:
        appid = params.get("appid", "")
        grant = self._by_refresh.get(params.get("refresh_token") or "")
        errcode = _first_error(
            (not appid, 41002), (appid not in self._apps, 40013),
            (not params.get("refresh_token"), 41003),
            (params.get("grant_type") != "refresh_token", 40002),
            (grant is None or grant.appid != appid or grant.state == "invalid", 40030),
            (grant is not None and grant.state == "revoked", 42007),
            (grant is not None
             and now >= grant.refresh_issued_at + self._refresh_token_days * _DAY_S, 42002),
        )
        if errcode or grant is None:
            return _error(errcode)
        # WeChat's doc: an expired access token is replaced; a live one keeps its value and
        # only has its expiry pushed out.
        if now >= grant.access_expires_at:
            if self._by_access.get(grant.access_token) is grant:
                del self._by_access[grant.access_token]
            grant.access_token = _token("AT")
            self._by_access[grant.access_token] = grant
        grant.access_expires_at = now + ACCESS_TOKEN_LIFETIME_S
        if self._rotate if grant.rotate is None else grant.rotate:
            if self._by_refresh.get(grant.refresh_token) is grant:
                del self._by_refresh[grant.refresh_token]
            grant.refresh_token, grant.refresh_issued_at = _token("RT"), now
            self._by_refresh[grant.refresh_token] = grant
        return _token_payload(grant)

    def _check_access(self, params: dict[str, str], now: float) -> tuple[_Grant | None, int]:
        """(the grant, 0) when the access token may be used, else (None, errcode)."""
        grant = self._by_access.get(params.get("access_token") or "")
        errcode = _first_error(
            (not params.get("access_token"), 41001), (not params.get("openid"), 41009),
            (grant is None, 40001),
            (grant is not None and grant.openid != params.get("openid"), 40003),
            (grant is not None and grant.state == "revoked", 42007),
            (grant is not None and now >= grant.access_expires_at, 42001),
        )
        return (None, errcode) if errcode else (grant, 0)

    def _auth(self, params: dict[str, str], now: float) -> dict[str, object]:
        errcode = self._check_access(params, now)[1]
        return _error(errcode, "ok" if errcode == 0 else None)

    def _userinfo(self, params: dict[str, str], now: float, *,
                  answered: bool = False) -> dict[str, object]:
        """The profile; ``answered``: it will reach the client (not lost to a failure)."""
        grant, errcode = self._check_access(params, now)
        if grant is None:
            return _error(errcode)
        # Website (QR) logins carry snsapi_login, which includes the profile.
        scopes = set(grant.scope.split(","))
        if grant.state == "snapshot" or not scopes & {"snsapi_userinfo", "snsapi_login"}:
            return _error(48001)
        if answered and self._avatar_change_every > 0:
            reads = self._profile_reads[grant.openid] = self._profile_reads.get(grant.openid, 0) + 1
            if reads % self._avatar_change_every == 0:
                self._change_avatar(grant.openid)
        payload: dict[str, object] = {
            "openid": grant.openid, "nickname": f"user-{grant.openid[-6:]}", "sex": 0,
            "province": "", "city": "", "country": "",
            "headimgurl": self._headimgurl(grant.openid), "privilege": [],
        }
        if grant.legacy_profile or self._legacy_profiles:
            # Before late 2021 WeChat gave sex and region; zh_CN (the default) and zh_TW in
            # Chinese.
            english = params.get("lang") == "en"
            payload.update({"sex": 1, "province": "Guangdong" if english else "广东",
                            "city": "Shenzhen" if english else "深圳",
                            "country": "CN" if english else "中国"})
        if grant.unionid:
            payload["unionid"] = grant.unionid
        payload.update(grant.profile or {})
        return payload

    def _headimgurl(self, openid: str) -> str:
        """The user's headimgurl as userinfo gives it (lock held)."""
        url = self._avatar_urls.get(openid)
        if url is None:
            key = self._image_key.get(openid, "")
            url = f"{self._url}/mmopen/{key}/132" if key else ""
        return url

    def _change_avatar(self, openid: str) -> None:
        """A new image key for the user (lock held); the old key is forgotten, so it 404s."""
        old = self._image_key.get(openid, "")
        if self._image_owner.get(old) == openid:
            del self._image_owner[old]  # a bench that changes avatars often must not grow
        key = secrets.token_hex(15)
        self._image_key[openid], self._image_owner[key] = key, openid

    def _avatar(self, path: str) -> _Reply:
        parts = path.split("/")  # "", "mmopen", key, size
        size = int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else -1
        key = parts[2] if len(parts) == 4 else ""
        with self._lock:
            owner = self._image_owner.get(key)
            live = size in AVATAR_SIZES and owner is not None and self._image_key[owner] == key
            self._avatars["served" if live else "not_found"] += 1
            if live:
                self._avatar_downloads[key] = self._avatar_downloads.get(key, 0) + 1
        return _Reply(200, "image/png", avatar_png(key, AVATAR_SIZES[size])) if live else _NOT_FOUND

    def _hostile_reply(self, path: str) -> _Reply:
        kind, _, rest = path.removeprefix("/hostile/").partition("/")
        if kind not in HOSTILE_KINDS:
            return _NOT_FOUND
        with self._lock:
            self._hostile[kind] = self._hostile.get(kind, 0) + 1
        if kind == "redirect-loop":
            hop = int(rest) + 1 if _HOP_RE.fullmatch(rest) else 1
            return _redirect(f"{self._url}/hostile/redirect-loop/{hop}")
        if kind == "redirect-ok":
            return _redirect(f"{self._url}/mmopen/{HOSTILE_OK_KEY}/0")
        if kind == "slow":
            return _Reply(200, "image/png", avatar_png("hostile-slow", 46), stall_s=HOSTILE_SLOW_S)
        return _HOSTILE_REPLIES[kind]

    def _admin(self, method: str, route: str, query: str, body: bytes) -> _Reply:
        if method == "GET" and route == "health":
            return _admin_reply({"ok": True})
        if method == "GET" and route == "stats":
            detail = dict(parse_qsl(query)).get("detail", "") in ("1", "true", "yes")
            return _admin_reply(self.stats(detail=detail))
        if method == "GET" and route == "answers":
            return _admin_reply({"answers": [describe(answer) for answer in ODD_ANSWERS]})
        if method != "POST" or route not in _ADMIN_POSTS:
            return _admin_reply({"error": f"no {method} /_sim/{route}"}, 404)
        try:
            data = json.loads(body) if body.strip() else {}
            if not isinstance(data, dict):
                raise TypeError("the body must be a JSON object")
            result = _ADMIN_POSTS[route](self, data)
            return _admin_reply({"ok": True} if result is None else result)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return _admin_reply({"error": f"{type(exc).__name__}: {exc}"}, 400)


def _token_payload(grant: _Grant) -> dict[str, object]:
    return {"access_token": grant.access_token, "expires_in": ACCESS_TOKEN_LIFETIME_S,
            "refresh_token": grant.refresh_token, "openid": grant.openid, "scope": grant.scope}


def _figures(counter: _Counter, quota: SimQuota | None, fixed: int,
             sliding: int) -> dict[str, object]:
    return {
        "calls": counter.calls, "ok": counter.ok, "errors": dict(sorted(counter.errors.items())),
        "quota_rejected": counter.quota_rejected, "secret_sent": counter.secret_sent,
        "quota": quota.count if quota else None, "window_s": quota.period_s if quota else None,
        "max_fixed_window": fixed, "max_sliding_window": sliding,
    }


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


def _redirect(location: str) -> _Reply:
    return _Reply(302, "text/html", b"", headers=(("Location", location),))


def _endless_png() -> Iterator[bytes]:
    """A PNG signature, then zeros: HOSTILE_ENDLESS_MAX_BYTES in all, unless the client hangs
    up first (the handler stops at the first failed write)."""
    zeros = bytes(_ENDLESS_CHUNK)
    yield PNG_SIGNATURE + zeros[len(PNG_SIGNATURE):]
    for _ in range(HOSTILE_ENDLESS_MAX_BYTES // _ENDLESS_CHUNK - 1):
        yield zeros


def _hostile_replies() -> dict[str, _Reply]:
    half_png = avatar_png("hostile-truncated", 64)
    return {
        "endless": _Reply(200, "image/png", b"", stream=_endless_png),
        "html": _Reply(200, "image/jpeg", _HTML_PAGE),
        "redirect-out": _redirect(HOSTILE_REDIRECT_OUT),
        "truncated": _Reply(200, "image/png", half_png[: len(half_png) // 2]),
        "bomb": _Reply(200, "image/png", bomb_png()),
        "gif": _Reply(200, "image/gif", GIF_1X1),
        "webp": _Reply(200, "image/webp", WEBP_1X1),
        "jpeg": _Reply(200, "image/jpeg", JPEG_1X1),
    }


# The hostile answers that never change (redirect-loop, redirect-ok and slow are made per request).
_HOSTILE_REPLIES = _hostile_replies()


def _pick(data: Mapping[str, Any], *names: str) -> dict[str, Any]:
    """The given fields of an admin request (JSON null = the default), as keyword arguments."""
    return {name: data[name] for name in names if data.get(name) is not None}


def _admin_config(sim: Simulator, data: dict[str, Any]) -> None:
    quotas = data.get("quotas")
    sim.configure(**_pick(data, "latency_s", "failure_rates", "rotate_refresh_tokens",
                          "avatar_change_every", "legacy_profiles"),
                  quotas=None if quotas is None else {
                      endpoint: None if text is None else parse_quota(str(text))
                      for endpoint, text in dict(quotas).items()})


def _admin_avatar(sim: Simulator, data: dict[str, Any]) -> None:
    """``{"openid", "image_key"}`` sets the avatar; ``{"openid", "url"}`` its headimgurl."""
    if "url" in data:
        if "image_key" in data:
            raise ValueError("give image_key or url, not both")
        sim.set_avatar_url(str(data["openid"]), data["url"])
    else:
        sim.set_avatar(str(data["openid"]), data.get("image_key"))


_ADMIN_POSTS: dict[str, Callable[[Simulator, dict[str, Any]], Mapping[str, object] | None]] = {
    "apps": lambda sim, data: sim.add_app(str(data["appid"]), str(data["secret"])),
    "grants": lambda sim, data: {"added": sim.add_grants(list(data["grants"]))},
    "codes": lambda sim, data: {"code": sim.issue_code(**_pick(
        data, "appid", "openid", "scope", "unionid", "snapshot", "ttl_s", "legacy_profile"))},
    "force": lambda sim, data: sim.force(str(data["endpoint"]), data["answer"],
                                         **_pick(data, "count", "openid")),
    "script": lambda sim, data: sim.script(str(data["openid"]), str(data["endpoint"]),
                                           data["answer"], **_pick(data, "count")),
    "avatar": lambda sim, data: _admin_avatar(sim, data),
    "config": _admin_config,
    "reset-stats": lambda sim, data: sim.reset_stats(),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled "timeout" answer must not keep the process alive
    allow_reuse_address = True
    request_queue_size = 1024  # a bench opens dozens of connections at once

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self.stopping = threading.Event()  # set by stop(): stalls and streams end early
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup, slow on machines without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # else the client gave up
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a bench would otherwise spend itself connecting
    server_version = "WeChatSimulator/1.0"
    sys_version = ""
    # Headers and body go out in two writes; with Nagle, delayed ACKs would add ~40 ms to each.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a log line per request would cost more than answering it."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.send_error(400, "bad Content-Length")
            return
        body = self.rfile.read(int(length))
        url = urlsplit(self.path)
        try:
            reply, delay_s = self.server.sim._handle(method, url.path, url.query, body)
        except Exception:
            traceback.print_exc()
            reply, delay_s = _admin_reply({"error": "simulator bug, see its stderr"}, 500), 0.0
        if delay_s > 0:
            self.server.stopping.wait(delay_s)
        if reply.close and not reply.body:
            self.close_connection = True  # a simulated timeout: no answer at all
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.stream is not None:
            self._stream(reply.stream())
            return
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def _stream(self, chunks: Iterator[bytes]) -> None:
        """Send a body delimited by the connection's close, until the chunks run out, the
        client hangs up or stops reading for long, or the simulator stops."""
        self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.connection.settimeout(_ENDLESS_WRITE_TIMEOUT_S)
        try:
            for chunk in chunks:
                if self.server.stopping.is_set():
                    break
                self.wfile.write(chunk)
        except (ConnectionError, TimeoutError):  # BrokenPipeError, ConnectionResetError...
            pass  # the client is gone (or as good as): stop writing, close the connection


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """``keeper simulate``: print ``{"url": ...}`` on one line, serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="keeper simulate",
                                     description="Run the WeChat OAuth2 simulator (a test tool).")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rotate", action="store_true", help="new refresh token on each refresh")
    parser.add_argument("--refresh-token-days", type=float, default=30.0)
    parser.add_argument("--quota", action="append", default=[], metavar="ENDPOINT=COUNT/PERIOD")
    parser.add_argument("--fail", action="append", default=[], metavar="KIND=RATE",
                        help="KIND: -1 (write --fail=-1=RATE), 502, truncated, timeout, html")
    parser.add_argument("--app", action="append", default=[], metavar="APPID=SECRET")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--avatar-change-every", type=int, default=0, metavar="N",
                        help="a user changes avatar before every Nth profile read (0: never)")
    parser.add_argument("--legacy-profiles", action="store_true",
                        help="answer the full pre-2021 profile (sex, province, city, country)")
    parser.add_argument("--script", action="append", default=[],
                        metavar="OPENID:ENDPOINT:ANSWER[:COUNT]",
                        help="serve that user an odd answer (a name from --list-answers), an "
                             "errcode or a failure kind on ENDPOINT, COUNT times (default 1)")
    parser.add_argument("--list-answers", action="store_true",
                        help="print the corpus of odd answers as JSON lines and exit")
    args = parser.parse_args(argv)
    if args.list_answers:
        for entry in ODD_ANSWERS:
            print(json.dumps(describe(entry), ensure_ascii=False))
        return 0
    if not _is_loopback(args.host):
        parser.error(f"--host {args.host} is not a loopback address: the simulator is a test tool")
    try:
        pairs = {option: [_pair(value) for value in getattr(args, option)]
                 for option in ("quota", "fail", "app")}
        quotas = {**DEFAULT_QUOTAS, **{_check_endpoint(endpoint): parse_quota(text)
                                       for endpoint, text in pairs["quota"]}}
        sim = Simulator(host=args.host, port=args.port, latency_s=args.latency_ms / 1000.0,
                        rotate_refresh_tokens=args.rotate,
                        refresh_token_days=args.refresh_token_days, quotas=quotas,
                        failure_rates={kind: float(rate) for kind, rate in pairs["fail"]},
                        seed=args.seed, avatar_change_every=args.avatar_change_every,
                        legacy_profiles=args.legacy_profiles)
        for text in args.script:
            openid, endpoint, answer, count = _script_option(text)
            sim.script(openid, endpoint, answer, count=count)
    except ValueError as exc:
        parser.error(str(exc))
    for appid, secret in pairs["app"]:
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


def _script_option(value: str) -> tuple[str, str, str, int]:
    """``OPENID:ENDPOINT:ANSWER[:COUNT]``, split from the right (an openid may hold colons;
    an answer such as ``-1`` or ``errcode_40030`` holds none)."""
    parts = value.rsplit(":", 3)
    if len(parts) == 4 and parts[3].isdigit() and parts[1] in ENDPOINTS:
        openid, endpoint, answer, count = parts[0], parts[1], parts[2], int(parts[3])
    else:
        parts = value.rsplit(":", 2)
        if len(parts) != 3 or parts[1] not in ENDPOINTS or not parts[0] or not parts[2]:
            raise ValueError(f"--script {value!r}: expected OPENID:ENDPOINT:ANSWER[:COUNT] with "
                             f"ENDPOINT one of {ENDPOINTS}")
        openid, endpoint, answer, count = parts[0], parts[1], parts[2], 1
    return openid, endpoint, answer, count


def _pair(value: str) -> tuple[str, str]:
    name, _, rest = value.partition("=")
    if not name or not rest:
        raise ValueError(f"expected NAME=VALUE, got {value!r}")
    return name, rest


if __name__ == "__main__":
    sys.exit(main())
