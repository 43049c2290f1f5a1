"""The simulator's state: apps, grants, codes, avatars, forced answers and counters, under one
lock. Every part of the simulator (set-up, endpoints, images, hostile hosts, admin routes) is a
mixin over ``SimState``."""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from keeper.wechat.simulator.records import (
    _HOSTILE_OK_OWNER,
    DEFAULT_QUOTAS,
    HOSTILE_OK_KEY,
    SimQuota,
    _check_endpoint,
    _check_every,
    _check_rates,
    _Code,
    _Counter,
    _default_image_key,
    _Forced,
    _Grant,
)

if TYPE_CHECKING:
    from keeper.wechat.simulator.server import _Server


class SimState:
    """The state every part of the simulator shares; see :class:`Simulator` for the knobs."""

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
        self._lifecycle = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url = ""

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``; valid once start() has bound the port."""
        if not self._url:
            raise RuntimeError("the simulator is not listening yet: call start()")
        return self._url

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

