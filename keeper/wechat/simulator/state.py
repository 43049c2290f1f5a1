"""The simulated WeChat: its state, and every rule that reads or changes it.

``SimState`` holds what WeChat holds (apps, grants, codes, avatars), the forced answers and the
counters, under one lock, and it is all the code that touches them: the set-up API, WeChat's
four sns endpoints (quotas, forced and random failures, scripted odd answers, then the real
logic of codes, refreshes, auth and userinfo), the avatar host under ``/mmopen/``, and what the
simulator saw (``stats``). It is the simulator without its HTTP server: ``Simulator`` (in
``server``) serves it and gives it its URL; the admin routes, the authorize pages and the
hostile hosts go through its public methods. Times are Unix seconds.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from keeper.wechat.simulator.answers import ODD_BY_NAME, OddAnswer, unionid_field
from keeper.wechat.simulator.errmsgs import make_rid, with_rid
from keeper.wechat.simulator.images import avatar_png
from keeper.wechat.simulator.records import (
    ACCESS_TOKEN_LIFETIME_S,
    DEFAULT_QUOTAS,
    ENDPOINTS,
    HOSTILE_OK_KEY,
    Code,
    Counter,
    Forced,
    Grant,
    SimQuota,
    check_endpoint,
    check_every,
    check_rates,
    make_grant,
    normalize_answer,
)
from keeper.wechat.simulator.replies import NOT_FOUND, Reply, api_reply, error, failure_reply

AVATAR_SIZES: dict[int, int] = {0: 640, 46: 46, 64: 64, 96: 96, 132: 132}  # 0 = the original
_HOSTILE_OK_OWNER = "\x00hostile"  # owns HOSTILE_OK_KEY; no grant can name this user
_DAY_S = 86400.0
_UNQUOTED_WINDOW_S = 60.0
_UNKNOWN_APP = "-"
_IMAGE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class SimState(ABC):
    """The state every part of the simulator shares, and the rules over it. Abstract: the
    server (:class:`Simulator`) completes it with its ``url`` and sets the knobs' defaults."""

    def __init__(self, *, latency_s: float, rotate_refresh_tokens: bool,
                 refresh_token_days: float, quotas: dict[str, SimQuota] | None,
                 failure_rates: dict[str, float] | None, timeout_sleep_s: float,
                 seed: int | None, clock: Callable[[], float], avatar_change_every: int,
                 legacy_profiles: bool) -> None:
        self._latency_s = latency_s
        self._rotate = rotate_refresh_tokens
        self._refresh_token_days = refresh_token_days
        self._quotas = dict(DEFAULT_QUOTAS if quotas is None else quotas)
        for endpoint in self._quotas:
            check_endpoint(endpoint)
        self._failure_rates = check_rates(failure_rates or {})
        self._timeout_sleep_s = timeout_sleep_s
        self._avatar_change_every = check_every(avatar_change_every)
        self._rng = random.Random(seed)
        # Apart from _rng, so that rids do not shift the seeded sequence of random failures.
        self._rid_rng = random.Random(None if seed is None else seed + 1)
        self._clock = clock
        self._legacy_profiles = legacy_profiles
        # One lock guards the state below; a request holds it for a few dict operations only.
        self._lock = threading.Lock()
        self._apps: dict[str, str] = {}
        self._by_access: dict[str, Grant] = {}
        self._by_refresh: dict[str, Grant] = {}
        self._by_user: dict[tuple[str, str], Grant] = {}  # (appid, openid) -> the latest grant
        self._codes: dict[str, Code] = {}
        self._image_key: dict[str, str] = {}  # openid -> current key, "" for no avatar
        self._image_owner: dict[str, str] = {}  # key -> openid; stale once that user moves on
        self._image_key[_HOSTILE_OK_OWNER] = HOSTILE_OK_KEY  # where redirect-ok leads
        self._image_owner[HOSTILE_OK_KEY] = _HOSTILE_OK_OWNER
        self._avatar_urls: dict[str, str] = {}  # openid -> headimgurl set by set_avatar_url
        # openid -> successful userinfo answers since avatar_change_every was last set.
        self._profile_reads: dict[str, int] = {}
        self._forced: dict[str, list[Forced]] = {}
        # Apart from the stats, so that reset_stats() cannot lift a quota.
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}
        self._counters: dict[tuple[str, str], Counter] = {}
        self._by_openid: dict[str, dict[str, int]] = {"refresh": {}, "userinfo": {}}
        self._avatars = {"served": 0, "not_found": 0}
        self._avatar_downloads: dict[str, int] = {}  # image key -> avatars served
        self._hostile: dict[str, int] = {}  # kind -> requests
        self._scripted: dict[str, int] = {}  # ODD_ANSWERS name -> times served
        self._codes_issued = 0

    @property
    @abstractmethod
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``, where the simulator's own links (a
        headimgurl, a hostile redirect) point; valid once start() has bound the port."""

    @property
    def latency_s(self) -> float:
        """How long the server sleeps before an answer (configure() changes it)."""
        return self._latency_s

    # -- set-up: the API of Simulator, also reachable over /_sim/ ----------------------------

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
        built = [make_grant(**item) for item in grants]  # all valid before any is stored
        with self._lock:
            for grant in built:
                self._store_grant(grant)
        return len(built)

    def current_tokens(self) -> dict[str, tuple[str, str]]:
        """openid → (access token, refresh token) as WeChat holds them now: what a keeper
        that lost nothing has stored."""
        with self._lock:
            return {g.openid: (g.access_token, g.refresh_token)
                    for g in self._by_refresh.values()}

    def access_expiries(self) -> dict[str, float]:
        """openid → when the newest access token WeChat issued expires (epoch seconds): a
        keeper that stored an older answer over a newer one has an earlier expiry than this."""
        with self._lock:
            return {g.openid: g.access_expires_at for g in self._by_refresh.values()}

    def issue_code(self, *, appid: str, openid: str, scope: str = "snsapi_login",
                   unionid: str | None = None, snapshot: bool = False,
                   ttl_s: float = 300.0, legacy_profile: bool = False,
                   profile: dict[str, object] | None = None) -> str:
        """A fresh login code, as WeChat passes to the app's callback; usable for ttl_s.

        ``scope`` defaults to ``snsapi_login``, what a website's QR login grants (an Official
        Account page grants ``snsapi_base`` or ``snsapi_userinfo``). Exchanging the code when
        the simulator already holds a grant of this user in this app replaces that grant's
        tokens (its old refresh token then answers 40030), as a new authorization does.
        ``profile``: fields merged over the default profile, as add_grant's (the exchange
        sets them on the grant; without it a grant the simulator holds keeps its own).
        """
        code = secrets.token_hex(16)
        with self._lock:
            self._codes[code] = Code(appid, openid, scope, unionid, snapshot,
                                     self._clock() + ttl_s, legacy_profile,
                                     profile=None if profile is None else dict(profile))
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
        forced = Forced(normalize_answer(answer), count, openid)
        odd = ODD_BY_NAME.get(forced.answer) if isinstance(forced.answer, str) else None
        if odd is not None and endpoint not in odd.endpoints:
            raise ValueError(f"answer {odd.name!r} is for {odd.endpoints}, not {endpoint!r}")
        with self._lock:
            self._forced.setdefault(check_endpoint(endpoint), []).append(forced)

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

    def configure(self, *, latency_s: float | None = None,
                  failure_rates: dict[str, float] | None = None,
                  rotate_refresh_tokens: bool | None = None,
                  quotas: Mapping[str, SimQuota | None] | None = None,
                  avatar_change_every: int | None = None,
                  legacy_profiles: bool | None = None) -> None:
        """Change knobs while serving; None leaves one as it is. ``failure_rates`` replace the
        old ones; ``quotas`` are merged (a None quota removes it) and restart the windows;
        ``avatar_change_every`` restarts each user's count of profile reads."""
        rates = None if failure_rates is None else check_rates(failure_rates)
        every = None if avatar_change_every is None else check_every(avatar_change_every)
        for endpoint in quotas or {}:
            check_endpoint(endpoint)  # all checked before any is applied
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

    # -- what the simulator saw --------------------------------------------------------------

    def stats(self, *, detail: bool = False) -> dict[str, object]:
        """What the simulator saw since start or reset_stats(); never holds token values.
        ``detail``: also the calls per openid and every call's arrival time, per endpoint.

        Window maxima count one app's arrivals within the endpoint's quota period (else 60 s).
        Calls naming no known app (auth/userinfo with an unknown token) count under app "-".
        """
        with self._lock:
            # Copy under the lock, compute outside it: sorting arrivals must not stall requests.
            rows = [(appid, endpoint, Counter(c.calls, c.ok, dict(c.errors), c.quota_rejected,
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
        totals = {endpoint: Counter() for endpoint in ENDPOINTS}
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
        if detail:  # every call's arrival (time.time()), oldest first: rates over a run
            arrivals: dict[str, list[float]] = {endpoint: [] for endpoint in ENDPOINTS}
            for _, endpoint, counter in rows:
                arrivals[endpoint].extend(counter.arrivals)
            result["arrivals"] = {endpoint: sorted(times) for endpoint, times in arrivals.items()}
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

    # -- requests, as the server and its pages pass them on ----------------------------------

    def knows_app(self, appid: str) -> bool:
        """Whether ``appid`` is a registered app."""
        with self._lock:
            return appid in self._apps

    def count_hostile_request(self, kind: str) -> None:
        """Count a request to a hostile host (for stats' ``hostile_requests``)."""
        with self._lock:
            self._hostile[kind] = self._hostile.get(kind, 0) + 1

    def serve_api(self, endpoint: str, params: dict[str, str]) -> Reply:
        """A call to WeChat's ``endpoint`` with its query ``params``, answered as WeChat
        would, or as the forced, random or scripted failure it meets says."""
        now = self._clock()
        with self._lock:
            appid, openid = self._subject(endpoint, params)
            counter = self._counters.get((appid, endpoint))
            if counter is None:
                counter = self._counters[(appid, endpoint)] = Counter()
            counter.calls += 1
            counter.arrivals.append(now)
            if endpoint == "refresh" and "secret" in params:
                counter.secret_sent += 1  # WeChat's refresh takes no secret: sending it leaks it
            if self._over_quota(appid, endpoint, now):
                counter.quota_rejected += 1
                return self._reply(error(45011), now)
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
                return failure_reply(failure, self._logic(endpoint, params, now),
                                     self._timeout_sleep_s, "")
            if endpoint == "code" and isinstance(failure, str):
                self._consume_code(params)
            rid = make_rid(now, self._rid_rng)
        return failure_reply(failure, {}, 0.0, rid)

    def serve_avatar(self, path: str) -> Reply:
        """``/mmopen/<key>/<size>``: the avatar while ``key`` is its user's current one (not an
        API call: never counted, forced or failed)."""
        parts = path.split("/")  # "", "mmopen", key, size
        size = int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else -1
        key = parts[2] if len(parts) == 4 else ""
        with self._lock:
            owner = self._image_owner.get(key)
            live = size in AVATAR_SIZES and owner is not None and self._image_key[owner] == key
            self._avatars["served" if live else "not_found"] += 1
            if live:
                self._avatar_downloads[key] = self._avatar_downloads.get(key, 0) + 1
        return Reply(200, "image/png", avatar_png(key, AVATAR_SIZES[size])) if live else NOT_FOUND

    # -- records (lock held) -----------------------------------------------------------------

    def _store_grant(self, grant: Grant) -> None:
        older = self._by_user.get((grant.appid, grant.openid))
        if older is not None and older is not grant:
            self._forget_tokens(older)
        self._by_user[(grant.appid, grant.openid)] = grant
        self._by_access[grant.access_token] = grant
        self._by_refresh[grant.refresh_token] = grant
        if grant.openid not in self._image_key:
            key = _default_image_key(grant.openid)
            self._image_key[grant.openid], self._image_owner[key] = key, grant.openid

    def _forget_tokens(self, grant: Grant) -> None:
        """The grant's tokens stop working (lock held): 40001 and 40030 from now on."""
        if self._by_access.get(grant.access_token) is grant:
            del self._by_access[grant.access_token]
        if self._by_refresh.get(grant.refresh_token) is grant:
            del self._by_refresh[grant.refresh_token]

    def _headimgurl(self, openid: str) -> str:
        """The user's headimgurl as userinfo gives it (lock held)."""
        url = self._avatar_urls.get(openid)
        if url is None:
            key = self._image_key.get(openid, "")
            url = f"{self.url}/mmopen/{key}/132" if key else ""
        return url

    def _change_avatar(self, openid: str) -> None:
        """A new image key for the user (lock held); the old key is forgotten, so it 404s."""
        old = self._image_key.get(openid, "")
        if self._image_owner.get(old) == openid:
            del self._image_owner[old]  # a bench that changes avatars often must not grow
        key = secrets.token_hex(15)
        self._image_key[openid], self._image_owner[key] = key, openid

    # -- the four endpoints (lock held) ------------------------------------------------------

    def _perform(self, endpoint: str, params: dict[str, str], now: float) -> dict[str, object]:
        """The real answer to a call that reaches the client (lock held)."""
        if endpoint == "userinfo":
            return self._userinfo(params, now, answered=True)
        return self._logic(endpoint, params, now)

    def _count(self, endpoint: str, counter: Counter, payload: Mapping[str, object]) -> None:
        outcome = str(payload.get("errcode") or "")
        if outcome:
            counter.errors[outcome] = counter.errors.get(outcome, 0) + 1
            return
        by_openid = self._by_openid.get(endpoint)
        if by_openid is not None:
            user = str(payload["openid"])
            by_openid[user] = by_openid.get(user, 0) + 1
        counter.ok += 1

    def _reply(self, payload: dict[str, object], now: float) -> Reply:
        """The API answer; an error's errmsg gets a rid, as WeChat's do today (lock held)."""
        if payload.get("errcode"):
            payload["errmsg"] = with_rid(str(payload.get("errmsg", "")),
                                         make_rid(now, self._rid_rng))
        return api_reply(payload)

    def _consume_code(self, params: dict[str, str]) -> None:
        # WeChat consumes a code even when it answers -1 (a retry gets 40163): this is why a
        # code exchange must never be retried.
        code = self._codes.get(params.get("code", ""))
        if code is not None and code.appid == params.get("appid"):
            code.used = True

    def _odd(self, endpoint: str, odd: OddAnswer, params: dict[str, str], now: float,
             counter: Counter) -> Reply:
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
        return Reply(200, odd.content_type, odd.render(values))

    def _as_it_stands(self, endpoint: str, params: dict[str, str]) -> dict[str, str]:
        """Placeholder values for an answer that changes nothing (lock held): the asker's
        tokens as they are (tokens never issued for a code, which is consumed)."""
        grant: Grant | None = None
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
            return error(errcode)
        code.used = True
        grant = self._by_user.get((appid, code.openid))
        if grant is None:
            grant = Grant(appid, code.openid, "", "", 0.0, 0.0,
                          legacy_profile=code.legacy_profile)
        else:
            # A new authorization of a user WeChat knows: the older tokens die with it (the
            # older refresh token then answers 40030); the user's profile stays theirs.
            self._forget_tokens(grant)
            grant.legacy_profile = grant.legacy_profile or code.legacy_profile
        grant.access_token, grant.refresh_token = _token("AT"), _token("RT")
        grant.access_expires_at, grant.refresh_issued_at = now + ACCESS_TOKEN_LIFETIME_S, now
        grant.scope, grant.unionid = code.scope, code.unionid
        grant.profile = grant.profile if code.profile is None else code.profile
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
            return error(errcode)
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

    def _check_access(self, params: dict[str, str], now: float) -> tuple[Grant | None, int]:
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
        return error(errcode, "ok" if errcode == 0 else None)

    def _userinfo(self, params: dict[str, str], now: float, *,
                  answered: bool = False) -> dict[str, object]:
        """The profile; ``answered``: it will reach the client (not lost to a failure)."""
        grant, errcode = self._check_access(params, now)
        if grant is None:
            return error(errcode)
        # Website (QR) logins carry snsapi_login, which includes the profile.
        scopes = set(grant.scope.split(","))
        if grant.state == "snapshot" or not scopes & {"snsapi_userinfo", "snsapi_login"}:
            return error(48001)
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

    def _logic(self, endpoint: str, params: dict[str, str], now: float) -> dict[str, object]:
        """The endpoint's work and its answer (lock held)."""
        if endpoint == "code":
            return self._exchange_code(params, now)
        if endpoint == "refresh":
            return self._refresh(params, now)
        if endpoint == "auth":
            return self._auth(params, now)
        return self._userinfo(params, now)


def _token(prefix: str) -> str:
    # From `secrets`, not the seeded rng: a restarted simulator must never reissue a token that
    # some keeper database still holds.
    return prefix + secrets.token_urlsafe(33)


def _default_image_key(openid: str) -> str:
    return hashlib.blake2b(openid.encode(), digest_size=15).hexdigest()


def _first_error(*checks: tuple[bool, int]) -> int:
    """The errcode of the first failed check, in WeChat's order; 0 when all pass."""
    return next((errcode for failed, errcode in checks if failed), 0)


def _token_payload(grant: Grant) -> dict[str, object]:
    return {"access_token": grant.access_token, "expires_in": ACCESS_TOKEN_LIFETIME_S,
            "refresh_token": grant.refresh_token, "openid": grant.openid, "scope": grant.scope}


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


def _figures(counter: Counter, quota: SimQuota | None, fixed: int,
             sliding: int) -> dict[str, object]:
    return {
        "calls": counter.calls, "ok": counter.ok, "errors": dict(sorted(counter.errors.items())),
        "quota_rejected": counter.quota_rejected, "secret_sent": counter.secret_sent,
        "quota": quota.count if quota else None, "window_s": quota.period_s if quota else None,
        "max_fixed_window": fixed, "max_sliding_window": sliding,
    }
