"""The simulator's JSON admin routes under ``/_sim/``: its set-up API and its ``stats`` over
HTTP, so that a simulator in another process (``keeper simulate``) can be set up and
inspected (README, "The simulator's admin API").

Every body is checked field by field before anything changes: a body that is not JSON, not an
object, lacks a required field, holds one of the wrong type or one the route does not take is
answered 400 ``{"error": "bad_request", "detail": "FIELD: what is wrong"}``, in words for the
person scripting the simulator (never a Python exception's text). An unknown route is 404
``{"error": "not_found", ...}``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from keeper.wechat.simulator.answers import ODD_ANSWERS, describe
from keeper.wechat.simulator.records import ENDPOINTS, GRANT_STATES, parse_quota
from keeper.wechat.simulator.replies import Reply, admin_reply
from keeper.wechat.simulator.state import SimState


class BadRequest(ValueError):
    """A body the route cannot take; the text names the field and what is wrong with it."""


@dataclass(frozen=True)
class Field:
    """One field a route takes: what JSON values it accepts (``what`` says it in words), and
    whether it is required. JSON null is the field's default, as if it were left out."""

    accepts: Callable[[Any], bool]
    what: str
    required: bool = False


def _string(value: Any) -> bool:
    return isinstance(value, str)


def _number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _object(value: Any) -> bool:
    return isinstance(value, dict)


def _answer(value: Any) -> bool:
    return _whole(value) or isinstance(value, str)


def _rates(value: Any) -> bool:
    return isinstance(value, dict) and all(_number(rate) for rate in value.values())


def _quotas(value: Any) -> bool:
    return isinstance(value, dict) and all(q is None or isinstance(q, str) for q in value.values())


STRING = Field(_string, "a string")
ANSWER = Field(_answer, "an errcode (a whole number), a failure kind or an ODD_ANSWERS name")
ENDPOINT = Field(_string, f"one of {', '.join(ENDPOINTS)}", required=True)

#: The fields of one grant of ``POST /_sim/grants`` (``Simulator.add_grant``'s arguments).
GRANT: dict[str, Field] = {
    "appid": Field(_string, "a string", required=True),
    "openid": Field(_string, "a string", required=True),
    "access_token": Field(_string, "a string", required=True),
    "refresh_token": Field(_string, "a string", required=True),
    "access_expires_at": Field(_number, "a number (Unix seconds)", required=True),
    "refresh_issued_at": Field(_number, "a number (Unix seconds)", required=True),
    "scope": STRING,
    "unionid": STRING,
    "state": Field(lambda v: v in GRANT_STATES, f"one of {', '.join(sorted(GRANT_STATES))}"),
    "profile": Field(_object, "an object of profile fields"),
    "rotate": Field(_flag, "true or false"),
    "legacy_profile": Field(_flag, "true or false"),
}

#: What each POST route takes.
FIELDS: dict[str, dict[str, Field]] = {
    "apps": {"appid": Field(_string, "a string", required=True),
             "secret": Field(_string, "a string", required=True)},
    "grants": {"grants": Field(lambda v: isinstance(v, list), "a list of grant objects",
                               required=True)},
    "codes": {"appid": Field(_string, "a string", required=True),
              "openid": Field(_string, "a string", required=True),
              "scope": STRING, "unionid": STRING,
              "snapshot": Field(_flag, "true or false"),
              "ttl_s": Field(_number, "a number of seconds"),
              "legacy_profile": Field(_flag, "true or false"),
              "profile": Field(_object, "an object of profile fields")},
    "force": {"endpoint": ENDPOINT, "answer": Field(_answer, ANSWER.what, required=True),
              "count": Field(_whole, "a whole number, at least 1"), "openid": STRING},
    "script": {"openid": Field(_string, "a string", required=True), "endpoint": ENDPOINT,
               "answer": Field(_answer, ANSWER.what, required=True),
               "count": Field(_whole, "a whole number, at least 1")},
    "avatar": {"openid": Field(_string, "a string", required=True),
               "image_key": Field(_string, "a string of A-Z a-z 0-9 _ - (null: no avatar)"),
               "url": STRING},
    "config": {"latency_s": Field(_number, "a number of seconds"),
               "failure_rates": Field(_rates, "an object of failure kind: probability"),
               "rotate_refresh_tokens": Field(_flag, "true or false"),
               "avatar_change_every": Field(_whole, "a whole number, 0 or more"),
               "legacy_profiles": Field(_flag, "true or false"),
               "quotas": Field(_quotas, 'an object of endpoint: "COUNT/PERIOD" (null: none)')},
    "reset-stats": {},
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else "a number"


def checked(data: Any, fields: Mapping[str, Field], where: str = "",
            kind: str = "an object") -> dict[str, Any]:
    """``data`` (``kind``) with its fields checked against ``fields``, JSON nulls left out (a
    default). Raises :class:`BadRequest` naming the first field at fault, ``where`` before its
    name (the body itself when ``where`` is empty)."""
    if not isinstance(data, dict):
        raise BadRequest(f"{where.rstrip('.')}: expected {kind}, got {_type_name(data)}"
                         if where else "the body must be a JSON object")
    for name in data:
        if name not in fields:
            expected = ", ".join(fields) or "no fields"
            raise BadRequest(f"{where}{name[:64]}: unknown field (expected {expected})")
    out = {}
    for name, field in fields.items():
        value = data.get(name)
        if value is None:
            if field.required:
                raise BadRequest(f"{where}{name}: required, {field.what}")
            continue
        if not field.accepts(value):
            raise BadRequest(f"{where}{name}: expected {field.what}, got {_type_name(value)}")
        out[name] = value
    return out


def admin_route(sim: SimState, method: str, route: str, query: str, body: bytes) -> Reply:
    """The answer to ``METHOD /_sim/<route>``: GET health, stats and answers; POST a set-up
    call with a JSON object body (an empty body is ``{}``). A bad body answers 400, an
    unknown route 404."""
    if method == "GET" and route == "health":
        return admin_reply({"ok": True})
    if method == "GET" and route == "stats":
        detail = dict(parse_qsl(query)).get("detail", "") in ("1", "true", "yes")
        return admin_reply(sim.stats(detail=detail))
    if method == "GET" and route == "answers":
        return admin_reply({"answers": [describe(answer) for answer in ODD_ANSWERS]})
    if method != "POST" or route not in _ADMIN_POSTS:
        return admin_reply({"error": "not_found", "detail": f"no {method} /_sim/{route}"}, 404)
    try:
        data = checked(_parse(body), FIELDS[route])
        result = _ADMIN_POSTS[route](sim, data)
    except ValueError as exc:  # BadRequest, or a value the simulator refuses (its own words)
        return admin_reply({"error": "bad_request", "detail": str(exc)}, 400)
    return admin_reply({"ok": True} if result is None else result)


def _parse(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except RecursionError:
        raise BadRequest("the body is not JSON (nested too deeply)") from None
    except ValueError:  # not UTF-8, or not JSON
        raise BadRequest("the body is not JSON") from None


def _grants(sim: SimState, data: dict[str, Any]) -> dict[str, object]:
    grants = [checked(item, GRANT, f"grants[{i}].", "a grant object")
              for i, item in enumerate(data["grants"])]
    return {"added": sim.add_grants(grants)}


def _config(sim: SimState, data: dict[str, Any]) -> None:
    quotas = data.pop("quotas", None)
    try:
        parsed = None if quotas is None else {
            endpoint: None if text is None else parse_quota(text)
            for endpoint, text in quotas.items()}
    except ValueError as exc:
        raise BadRequest(f"quotas: {exc}") from None
    sim.configure(**data, quotas=parsed)


def _avatar(sim: SimState, data: dict[str, Any]) -> None:
    """``{"openid", "image_key"}`` sets the avatar; ``{"openid", "url"}`` its headimgurl."""
    if "url" in data:
        if "image_key" in data:
            raise BadRequest("url: give image_key or url, not both")
        sim.set_avatar_url(data["openid"], data["url"])
    else:
        sim.set_avatar(data["openid"], data.get("image_key"))


_ADMIN_POSTS: dict[str, Callable[[SimState, dict[str, Any]], Mapping[str, object] | None]] = {
    "apps": lambda sim, data: sim.add_app(data["appid"], data["secret"]),
    "grants": _grants,
    "codes": lambda sim, data: {"code": sim.issue_code(**data)},
    "force": lambda sim, data: sim.force(data.pop("endpoint"), data.pop("answer"), **data),
    "script": lambda sim, data: sim.script(data.pop("openid"), data.pop("endpoint"),
                                           data.pop("answer"), **data),
    "avatar": _avatar,
    "config": _config,
    "reset-stats": lambda sim, data: sim.reset_stats(),
}
