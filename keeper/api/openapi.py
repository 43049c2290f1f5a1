"""The OpenAPI 3.1 document of the API, served at ``/openapi.json``.

Written out rather than derived: it is the contract applications code against, and the
schemathesis run (tests/api/test_schema.py) checks every answer of the running server
against it, so it cannot drift from what the server does.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from keeper import __version__
from keeper.api.keys import SCOPES
from keeper.api.protocol import MAX_HEAD_BYTES
from keeper.config import ACCESS_TOKEN_LIFE_S, Config
from keeper.core.grant_lines import AHEAD, EARLIEST, ID_RE, MAX_SCOPE_CHARS, MAX_TOKEN_BYTES

ID_PATTERN = f"^{ID_RE.pattern}$"
#: Printable ASCII without spaces: WeChat's tokens and login codes.
TOKEN_PATTERN = f"^[\\x21-\\x7e]{{1,{MAX_TOKEN_BYTES}}}$"
#: RFC 3339 (keeper also reads the other ISO 8601 forms with an offset that Python does).
ISO_PATTERN = ("^[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
               "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?"
               "(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")
#: The times keeper answers (keeper.core.timestamps): RFC 3339, UTC, whole seconds, ``Z``.
TIMESTAMP_PATTERN = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
#: The image types keeper keeps avatars as (keeper.avatars.fetcher).
IMAGES = ("image/jpeg", "image/png", "image/gif", "image/webp")
REASONS = ["refresh_token_invalid", "refresh_token_expired", "authorization_revoked",
           "refresh_token_expiring", "other"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **more: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **more}


def _obj(required: list[str], props: dict[str, Any], *, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "required": required, "properties": props}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _json(schema: str, description: str, headers: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": {"application/json": {"schema": _ref(schema)}}}
    if headers:
        answer["headers"] = headers
    return answer


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before asking again",
                               "required": True,
                               "schema": {"type": "integer", "minimum": 1}}}
CHALLENGE = {"WWW-Authenticate": {"description": "how to authenticate", "required": True,
                                  "schema": {"type": "string", "const": 'Bearer realm="keeper"'}}}
ERRORS = {
    "400": _json("Error", "a bad request: `field` names the parameter or body field at fault; "
                 "`code_rejected`: WeChat refused the login code (`errcode`)"),
    "401": _json("Error", "no known API key (`Authorization: Bearer KEY`)", CHALLENGE),
    "403": _json("Error", "the key lacks the scope this operation needs"),
    "404": _json("Error", "`unknown_app`, `no_grant`, `no_avatar` or `not_found`"),
    "413": _json("Error", "the body is larger than the limit (64 KiB)"),
    "415": _json("Error", "`unsupported_media_type`: a body sent without `Content-Type: "
                 "application/json` (another type, or none)"),
    "431": _json("Error", f"`headers_too_large`: the request line and headers came to more "
                 f"than {MAX_HEAD_BYTES} bytes (32 KiB); the connection is closed"),
    "500": _json("Error", "`app_secret_missing`: keeper has no AppSecret for the app (the "
                 "server's configuration: `detail` says where it is read from); asking again "
                 "changes nothing until an operator sets it"),
    "503": _json("Error", "try again after `Retry-After` seconds: `wechat_unavailable`, "
                 "`quota_exhausted`, `grant_busy`, `database_unavailable`, `app_rejected`",
                 RETRY_AFTER),
}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: ERRORS[c] for c in codes}


def _param(name: str, where: str, schema: dict[str, Any], description: str,
           required: bool = True) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description,
            "schema": schema}


def _time(name: str, now: datetime) -> dict[str, Any]:
    """A time keeper accepts in a grant: from 2010 to a little after ``now``. The bound on Unix
    seconds is taken at start-up and cut to midnight (UTC), so it stays inside what the server
    takes later and the document stays the same all day."""
    ahead = now + AHEAD.get(name, timedelta(days=1))
    latest = ahead.replace(hour=0, minute=0, second=0, microsecond=0)
    return {"oneOf": [
        {"type": "number", "minimum": int(EARLIEST.timestamp()),
         "maximum": int(latest.timestamp())},
        {"type": "string", "format": "date-time", "pattern": ISO_PATTERN},
    ], "description": f"ISO 8601 with offset, or Unix seconds; from {EARLIEST:%Y-%m-%d} to "
                      f"{AHEAD.get(name, timedelta(days=1)).days} days from now"}


def document(config: Config, now: datetime) -> str:
    """The document, with the configured appids as the only ones the paths take; ``now``
    bounds the times a grant may carry."""
    appids = sorted(a.appid for a in config.apps)
    string = {"type": "string"}
    time = {"type": "string", "format": "date-time", "pattern": TIMESTAMP_PATTERN}
    appid = _param("appid", "path", {"type": "string", "enum": appids} if appids else
                   {"type": "string", "pattern": ID_PATTERN}, "a configured WeChat appid")
    an_appid = {"type": "string", "enum": appids} if appids else string
    an_id = {"type": "string", "pattern": ID_PATTERN}
    openid = _param("openid", "path", an_id, "the user's openid in that app")
    user = [appid, openid]
    reauth_props = {"appid": string, "openid": string, "unionid": _nullable("string"),
                    "reason": {"type": "string", "enum": REASONS},
                    "errcode": _nullable("integer"), "since": time}
    schemas: dict[str, Any] = {
        "Error": _obj(["error", "detail"], {
            "error": string, "detail": string, "field": string,
            "errcode": _nullable("integer"), "reason": {"type": "string", "enum": REASONS},
            "since": _nullable("string", format="date-time", pattern=TIMESTAMP_PATTERN),
        }),
        "Health": _obj(["status"], {"status": {"type": "string", "enum": ["ok", "unavailable"]},
                                    "error": string, "detail": string}),
        "LoginRequest": _obj(["appid", "code"], {
            "appid": an_appid,
            "code": {"type": "string", "pattern": TOKEN_PATTERN},
        }),
        "Login": _obj(["appid", "openid", "unionid", "scope", "is_snapshotuser"], {
            "appid": string, "openid": string, "unionid": _nullable("string"),
            "scope": string, "is_snapshotuser": {"type": "boolean"},
        }),
        "GrantIn": _obj(["access_token", "refresh_token", "scope", "access_expires_at",
                         "refresh_issued_at"], {
            "appid": {**an_appid, "description": "optional; the path's, if given"},
            "openid": {**an_id, "description": "optional; the path's, if given"},
            "access_token": {"type": "string", "pattern": TOKEN_PATTERN},
            "refresh_token": {"type": "string", "pattern": TOKEN_PATTERN},
            "scope": {"type": "string", "pattern": "^[a-z_]+(,[a-z_]+)*$",
                      "maxLength": MAX_SCOPE_CHARS},
            "unionid": {"oneOf": [{"type": "null"}, an_id,
                                  {"type": "string", "pattern": "^\\s*$"}],
                        "description": "null or blank: none"},
            "access_expires_at": _time("access_expires_at", now),
            "refresh_issued_at": {**_time("refresh_issued_at", now), "description":
                                  "when WeChat first issued this refresh token (ISO 8601 with "
                                  "offset, or Unix seconds)"},
        }),
        "Grant": _obj(["appid", "openid", "unionid", "scope", "state", "access_expires_at",
                       "refresh_issued_at"], {
            "appid": string, "openid": string, "unionid": _nullable("string"),
            "scope": string, "state": string, "access_expires_at": time,
            "refresh_issued_at": time,
        }),
        "Token": _obj(["access_token", "expires_at", "openid", "scope"], {
            "access_token": string, "expires_at": time, "openid": string, "scope": string,
        }),
        "Profile": _obj(["appid", "openid", "unionid", "scope", "state", "reauth"], {
            "appid": string, "openid": string, "unionid": _nullable("string"), "scope": string,
            "state": string, "access_expires_at": time, "refresh_issued_at": time,
            "reauth": {"oneOf": [{"type": "null"}, _obj(["reason", "errcode", "since"], {
                "reason": {"type": "string", "enum": REASONS},
                "errcode": _nullable("integer"), "since": time})]},
            "profile_stop": _nullable("integer"),
            "nickname": _nullable("string"),
            "sex": {"type": ["integer", "null"], "enum": [0, 1, 2, None],
                    "description": "WeChat's code: 0 unknown, 1 male, 2 female; null when no "
                                   "profile was read, or WeChat's had none"},
            "province": _nullable("string"), "city": _nullable("string"),
            "country": _nullable("string"), "headimgurl": _nullable("string"),
            "privilege": {"type": ["array", "null"], "items": string},
            "profile_errcode": _nullable("integer"),
            "fetched_at": _nullable("string", format="date-time", pattern=TIMESTAMP_PATTERN),
            "avatar_url": _nullable("string"), "avatar_sha256": _nullable("string"),
            "avatar_path": _nullable("string"), "avatar_size": _nullable("integer"),
            "avatar_type": _nullable("string"),
            "avatar_saved_at": _nullable("string", format="date-time", pattern=TIMESTAMP_PATTERN),
            "avatar_error": _nullable("string"),
        }),
        "ReauthPage": _obj(["users", "next"], {
            "users": {"type": "array", "items": _obj(list(reauth_props), reauth_props)},
            "next": {"type": "string", "pattern": "^[0-9]+$",
                     "description": "pass it back as `after` for the next page"},
        }),
        "UnionidGrants": _obj(["grants"], {"grants": {"type": "array", "items": _obj(
            ["appid", "openid", "state"], {"appid": string, "openid": string,
                                           "state": string})}}),
    }

    def op(summary: str, scope: str | None, responses: dict[str, Any],
           params: list[dict[str, Any]] | None = None, body: str | None = None
           ) -> dict[str, Any]:
        # Any request's head may be too large, whatever its route.
        o: dict[str, Any] = {"summary": summary, "responses": {**responses, **_errors("431")}}
        if params:
            o["parameters"] = params
        if body:
            o["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _ref(body)}}}
        if scope is None:
            o["security"] = []
        else:
            o["description"] = f"Needs a key with the scope `{scope}`."
            o["security"] = [{"bearer": []}]
        return o

    avatar_headers = {
        "ETag": {"description": "the image's SHA-256, quoted", "required": True,
                 "schema": {"type": "string", "pattern": '^"[0-9a-f]{64}"$'}},
        "Cache-Control": {"required": True, "schema": {"type": "string"}}}
    paths = {
        "/healthz": {"get": op("the server and its database answer", None, {
            "200": _json("Health", "ok"),
            "503": _json("Health", "the database does not answer", RETRY_AFTER)})},
        "/openapi.json": {"get": op("this document", None, {
            "200": {"description": "OpenAPI 3.1", "content": {"application/json": {
                "schema": {"type": "object"}}}}})},
        "/v1/grants": {"post": op(
            "exchange a login code (never retried: a code is single-use) and keep the grant",
            "grants", {"201": _json("Login", "the grant is kept"),
                       **_errors("400", "401", "403", "404", "413", "415", "500", "503")},
            body="LoginRequest")},
        "/v1/apps/{appid}/users/{openid}": {
            "put": op("upsert a grant the application obtained itself; clears any "
                      "re-authorization record", "grants",
                      {"200": _json("Grant", "replaced"), "201": _json("Grant", "created"),
                       **_errors("400", "401", "403", "404", "413", "415", "503")},
                      user, body="GrantIn"),
            "delete": op("forget the user: tokens, profile, re-authorization record, and the "
                         "avatar file once no other profile uses it", "grants",
                         {"204": {"description": "forgotten"},
                          **_errors("400", "401", "403", "404", "503")}, user),
            "get": op("the stored profile (no tokens)", "read",
                      {"200": _json("Profile", "the profile"),
                       **_errors("400", "401", "403", "404", "503")}, user),
        },
        "/v1/apps/{appid}/users/{openid}/token": {"get": op(
            "a valid access token, refreshed first when it would expire within `min_valid` "
            "seconds; requests at once for one stale token make one refresh call", "tokens",
            {"200": _json("Token", "the token", {"Cache-Control": {
                "required": True, "schema": {"type": "string", "const": "no-store"}}}),
             "409": _json("Error", "`reauth_required`: the user must log in again "
                                   "(`reason`, `errcode`, `since`)"),
             **_errors("400", "401", "403", "404", "503")},
            [*user, _param("min_valid", "query",
                           {"type": "integer", "minimum": 0,
                            "maximum": ACCESS_TOKEN_LIFE_S - 600},
                           "seconds the token must stay valid (default: access_margin, "
                           f"{int(config.access_margin_s)})", required=False)])},
        "/v1/apps/{appid}/users/{openid}/avatar": {"get": op(
            "the kept avatar image; `ETag` is its SHA-256", "read",
            {"200": {"description": "the image", "headers": avatar_headers, "content": {
                kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGES}},
             "304": {"description": "`If-None-Match` matched", "headers": avatar_headers},
             **_errors("400", "401", "403", "404", "503")},
            [*user, _param("If-None-Match", "header", string, "an ETag seen before",
                           required=False)])},
        "/v1/reauth": {"get": op(
            "re-authorization records in the order they were written; pass `next` back as "
            "`after` to see each record written since, exactly once", "read",
            {"200": _json("ReauthPage", "a page"), **_errors("400", "401", "403", "503")},
            [_param("after", "query", {"type": "integer", "minimum": 0,
                                       "maximum": 2**62}, "a cursor (`next`)", False),
             _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000},
                    "records per page (default 100)", False)])},
        "/metrics": {"get": op(
            "Prometheus metrics: this server's requests and WeChat calls, and the database's "
            "counts (docs/reference/metrics.md)", "read",
            {"200": {"description": "Prometheus text format 0.0.4", "content": {
                "text/plain": {"schema": {"type": "string"}}}},
             **_errors("401", "403")})},
        "/status": {"get": {**op(
            "the status page (HTML): grants by state, the re-login forecast, the last sweeps, "
            "quota used", "read",
            {"200": {"description": "the page", "content": {
                "text/html": {"schema": {"type": "string"}}}},
             "401": _json("Error", "no known API key: `Authorization: Bearer KEY`, or the key "
                          "as the password of HTTP Basic authentication", {
                              "WWW-Authenticate": {"required": True, "schema": {
                                  "type": "string",
                                  "const": 'Basic realm="keeper", charset="UTF-8"'}}}),
             **_errors("403", "503")}),
            "security": [{"bearer": []}, {"basic": []}]}},
        "/v1/unionids/{unionid}": {"get": op(
            "the grants of one WeChat user across the apps of one open platform account",
            "read", {"200": _json("UnionidGrants", "the grants (none: an empty list)"),
                     **_errors("400", "401", "403", "503")},
            [_param("unionid", "path", {"type": "string", "pattern": ID_PATTERN},
                    "the unionid")])},
    }
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "keeper", "version": __version__, "description":
                 "Hand keeper a WeChat login, take a valid access token, learn who must log "
                 f"in again. Key scopes: {', '.join(SCOPES)}. Errors are "
                 "`{\"error\", \"detail\"}`. Times are RFC 3339 in UTC, to the whole "
                 "second: `2026-11-30T08:00:00Z`."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "a key from `keeper api-key`"},
            "basic": {"type": "http", "scheme": "basic",
                      "description": "any user name, and a key as the password (/status "
                                     "only: what a browser asks for)"}}},
    }
    return json.dumps(doc, indent=1)
