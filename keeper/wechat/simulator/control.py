"""Setting the simulator up: apps, grants, codes, forced and scripted answers, avatars, knobs."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from keeper.wechat.simulator.answers import ODD_BY_NAME
from keeper.wechat.simulator.records import (
    _IMAGE_KEY_RE,
    SimQuota,
    _check_endpoint,
    _check_every,
    _check_rates,
    _Code,
    _Forced,
    _make_grant,
    _normalize_answer,
)
from keeper.wechat.simulator.state import SimState


class Control(SimState):
    """The set-up API of :class:`Simulator` (also reachable over ``/_sim/``)."""

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
            self._codes[code] = _Code(appid, openid, scope, unionid, snapshot,
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

