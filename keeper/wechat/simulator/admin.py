"""The simulator's inspection (``stats``) and its JSON admin routes under ``/_sim/``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from keeper.wechat.simulator.answers import ODD_ANSWERS, describe
from keeper.wechat.simulator.control import Control
from keeper.wechat.simulator.records import (
    _UNQUOTED_WINDOW_S,
    ENDPOINTS,
    SimQuota,
    _admin_reply,
    _Counter,
    _Reply,
    parse_quota,
)


class Admin(Control):
    """What the simulator saw, and the ``/_sim/`` routes that set it up and inspect it."""

    def stats(self, *, detail: bool = False) -> dict[str, object]:
        """What the simulator saw since start or reset_stats(); never holds token values.
        ``detail``: also the calls per openid and every call's arrival time, per endpoint.

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


def _figures(counter: _Counter, quota: SimQuota | None, fixed: int,
             sliding: int) -> dict[str, object]:
    return {
        "calls": counter.calls, "ok": counter.ok, "errors": dict(sorted(counter.errors.items())),
        "quota_rejected": counter.quota_rejected, "secret_sent": counter.secret_sent,
        "quota": quota.count if quota else None, "window_s": quota.period_s if quota else None,
        "max_fixed_window": fixed, "max_sliding_window": sliding,
    }



def _pick(data: Mapping[str, Any], *names: str) -> dict[str, Any]:
    """The given fields of an admin request (JSON null = the default), as keyword arguments."""
    return {name: data[name] for name in names if data.get(name) is not None}


def _admin_config(sim: Admin, data: dict[str, Any]) -> None:
    quotas = data.get("quotas")
    sim.configure(**_pick(data, "latency_s", "failure_rates", "rotate_refresh_tokens",
                          "avatar_change_every", "legacy_profiles"),
                  quotas=None if quotas is None else {
                      endpoint: None if text is None else parse_quota(str(text))
                      for endpoint, text in dict(quotas).items()})


def _admin_avatar(sim: Admin, data: dict[str, Any]) -> None:
    """``{"openid", "image_key"}`` sets the avatar; ``{"openid", "url"}`` its headimgurl."""
    if "url" in data:
        if "image_key" in data:
            raise ValueError("give image_key or url, not both")
        sim.set_avatar_url(str(data["openid"]), data["url"])
    else:
        sim.set_avatar(str(data["openid"]), data.get("image_key"))


_ADMIN_POSTS: dict[str, Callable[[Admin, dict[str, Any]], Mapping[str, object] | None]] = {
    "apps": lambda sim, data: sim.add_app(str(data["appid"]), str(data["secret"])),
    "grants": lambda sim, data: {"added": sim.add_grants(list(data["grants"]))},
    "codes": lambda sim, data: {"code": sim.issue_code(**_pick(
        data, "appid", "openid", "scope", "unionid", "snapshot", "ttl_s", "legacy_profile",
        "profile"))},
    "force": lambda sim, data: sim.force(str(data["endpoint"]), data["answer"],
                                         **_pick(data, "count", "openid")),
    "script": lambda sim, data: sim.script(str(data["openid"]), str(data["endpoint"]),
                                           data["answer"], **_pick(data, "count")),
    "avatar": lambda sim, data: _admin_avatar(sim, data),
    "config": _admin_config,
    "reset-stats": lambda sim, data: sim.reset_stats(),
}

