"""The simulator's JSON admin routes under ``/_sim/``: its set-up API and its ``stats`` over
HTTP, so that a simulator in another process (``keeper simulate``) can be set up and
inspected."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from keeper.wechat.simulator.answers import ODD_ANSWERS, describe
from keeper.wechat.simulator.records import parse_quota
from keeper.wechat.simulator.replies import Reply, admin_reply
from keeper.wechat.simulator.state import SimState


def admin_route(sim: SimState, method: str, route: str, query: str, body: bytes) -> Reply:
    """The answer to ``METHOD /_sim/<route>``: GET health, stats and answers; POST a set-up
    call with a JSON object body. A bad body answers 400, an unknown route 404."""
    if method == "GET" and route == "health":
        return admin_reply({"ok": True})
    if method == "GET" and route == "stats":
        detail = dict(parse_qsl(query)).get("detail", "") in ("1", "true", "yes")
        return admin_reply(sim.stats(detail=detail))
    if method == "GET" and route == "answers":
        return admin_reply({"answers": [describe(answer) for answer in ODD_ANSWERS]})
    if method != "POST" or route not in _ADMIN_POSTS:
        return admin_reply({"error": f"no {method} /_sim/{route}"}, 404)
    try:
        data = json.loads(body) if body.strip() else {}
        if not isinstance(data, dict):
            raise TypeError("the body must be a JSON object")
        result = _ADMIN_POSTS[route](sim, data)
        return admin_reply({"ok": True} if result is None else result)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return admin_reply({"error": f"{type(exc).__name__}: {exc}"}, 400)


def _pick(data: Mapping[str, Any], *names: str) -> dict[str, Any]:
    """The given fields of an admin request (JSON null = the default), as keyword arguments."""
    return {name: data[name] for name in names if data.get(name) is not None}


def _admin_config(sim: SimState, data: dict[str, Any]) -> None:
    quotas = data.get("quotas")
    sim.configure(**_pick(data, "latency_s", "failure_rates", "rotate_refresh_tokens",
                          "avatar_change_every", "legacy_profiles"),
                  quotas=None if quotas is None else {
                      endpoint: None if text is None else parse_quota(str(text))
                      for endpoint, text in dict(quotas).items()})


def _admin_avatar(sim: SimState, data: dict[str, Any]) -> None:
    """``{"openid", "image_key"}`` sets the avatar; ``{"openid", "url"}`` its headimgurl."""
    if "url" in data:
        if "image_key" in data:
            raise ValueError("give image_key or url, not both")
        sim.set_avatar_url(str(data["openid"]), data["url"])
    else:
        sim.set_avatar(str(data["openid"]), data.get("image_key"))


_ADMIN_POSTS: dict[str, Callable[[SimState, dict[str, Any]], Mapping[str, object] | None]] = {
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
