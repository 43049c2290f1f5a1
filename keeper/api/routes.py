"""The API's handlers for applications: health, the OpenAPI document, logins and grants,
tokens, profiles and avatars, the re-authorization feed. Each is declared with its method and
path in :data:`table`, runs in the thread pool and returns a response or raises a
:class:`~keeper.api.http.Problem`; the domain's exceptions (no grant, must re-authorize,
WeChat unavailable) are answered in one place, :mod:`keeper.api.http`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from keeper.api.context import Api
from keeper.api.documents import profile_document, reauth_row
from keeper.api.http import Problem, RouteTable, bad_request, error_answer, path_id, query_int
from keeper.api.logins import exchange
from keeper.clock import utcnow
from keeper.config import ACCESS_TOKEN_LIFE_S
from keeper.core.grant_lines import REQUIRED, BadLine, parse_line
from keeper.core.models import REAUTH, Grant
from keeper.core.policy import schedule
from keeper.core.timestamps import timestamp
from keeper.errors import StoreError
from keeper.store.rows import GrantWrite
from keeper.store.token_reader import Unreadable

log = structlog.get_logger("keeper.api")

#: The longest login code keeper passes on (WeChat's are 32 characters).
MAX_CODE_CHARS = 512
FEED_LIMIT = 100
FEED_MAX = 1000

#: The routes of this module's handlers, each declared on its handler.
table = RouteTable()


def _app(api: Api, appid: str) -> str:
    if appid not in api.appids:
        raise Problem(404, "unknown_app", f"app {appid} is not configured")
    return appid


def _grant(api: Api, request: Request) -> Grant:
    appid = _app(api, path_id(request, "appid"))
    openid = path_id(request, "openid")
    grant = api.store.get_grant(appid, openid)
    if grant is None:
        raise Problem(404, "no_grant", f"no grant for openid {openid} of app {appid}")
    return grant


@table.endpoint("GET", "/healthz", None)
def healthz(api: Api, request: Request, body: Any) -> Response:
    try:
        api.store.ping()
    except StoreError as e:
        return JSONResponse({"status": "unavailable", "error": "database_unavailable",
                             "detail": str(e)}, 503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok"})


@table.endpoint("GET", "/openapi.json", None)
def openapi(api: Api, request: Request, body: Any) -> Response:
    return Response(api.openapi, media_type="application/json")


@table.endpoint("POST", "/v1/grants", "grants", body=True)
def create_grant(api: Api, request: Request, body: dict[str, Any]) -> Response:
    for name in body:
        if name not in ("appid", "code"):
            raise bad_request(str(name)[:64], "unknown field (expected appid and code)")
    appid, code = body.get("appid"), body.get("code")
    if not isinstance(appid, str) or not appid:
        raise bad_request("appid", "required, a string")
    if not isinstance(code, str) or not code:
        raise bad_request("code", "required, a string")
    if len(code) > MAX_CODE_CHARS or not code.isascii() or not code.isprintable() \
            or " " in code:
        raise bad_request("code", f"expected printable ASCII, at most {MAX_CODE_CHARS} "
                                  "characters")
    app = api.config.app(_app(api, appid))
    login = exchange(config=api.config, app=app, code=code, store=api.store,
                     client=api.client, gate=api.rt.gate, max_wait_s=5)
    return JSONResponse({"appid": login.appid, "openid": login.openid,
                         "unionid": login.unionid, "scope": login.scope,
                         "is_snapshotuser": login.is_snapshotuser}, 201)


@table.endpoint("PUT", "/v1/apps/{appid}/users/{openid}", "grants", body=True)
def put_grant(api: Api, request: Request, body: dict[str, Any]) -> Response:
    appid = _app(api, path_id(request, "appid"))
    openid = path_id(request, "openid")
    for name, value in (("appid", appid), ("openid", openid)):
        if name in body and body[name] != value:
            raise bad_request(name, "differs from the path")
    unknown = [k for k in body if k not in REQUIRED and k != "unionid"]
    if unknown:
        raise bad_request(str(unknown[0])[:64], "unknown field")
    try:
        grant, _ = parse_line(json.dumps({**body, "appid": appid, "openid": openid}),
                              appids=api.appids, now=utcnow())
    except BadLine as e:
        raise bad_request(e.field, str(e).removeprefix(f"{e.field}: ")) from None
    existed = api.store.token_row(appid, openid) is not None
    clock = api.config.lifetime(api.config.app(appid))
    api.store.upsert_grants([GrantWrite(grant, schedule(grant, clock))], utcnow())
    log.info("grant.stored", appid=appid, openid=openid, source="api")
    return JSONResponse({"appid": appid, "openid": openid, "unionid": grant.unionid,
                         "scope": grant.scope, "state": grant.state,
                         "access_expires_at": timestamp(grant.access_expires_at),
                         "refresh_issued_at": timestamp(grant.refresh_issued_at)},
                        200 if existed else 201)


@table.endpoint("DELETE", "/v1/apps/{appid}/users/{openid}", "grants")
def delete_grant(api: Api, request: Request, body: Any) -> Response:
    appid = _app(api, path_id(request, "appid"))
    openid = path_id(request, "openid")
    found, avatar = api.store.delete_user(appid, openid)
    if not found:
        raise Problem(404, "no_grant", f"no grant for openid {openid} of app {appid}")
    removed = False
    if avatar is not None:
        path = api.config.avatar_dir / avatar
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("avatar.not_removed", file=str(path), error=e.strerror)
    log.info("grant.deleted", appid=appid, openid=openid, avatar_removed=removed)
    return Response(status_code=204)


def _token_args(api: Api, request: Request) -> tuple[str, str, int]:
    appid = _app(api, path_id(request, "appid"))
    openid = path_id(request, "openid")
    margin = int(api.config.access_margin_s)
    return appid, openid, query_int(request, "min_valid", margin, 0, ACCESS_TOKEN_LIFE_S - 600)


#: The token answer's encoding, JSONResponse's own, made once rather than per answer.
_COMPACT = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class _TokenAnswer(Response):
    """A token: the body and headers JSONResponse would make, with Cache-Control: no-store,
    built without its per-answer work (an encoder made, the headers looked through)."""

    media_type = "application/json"

    def __init__(self, openid: str, access_token: str, expires_at: datetime,
                 scope: str) -> None:
        body = _COMPACT.encode({"access_token": access_token,
                                "expires_at": timestamp(expires_at), "openid": openid,
                                "scope": scope}).encode("utf-8")
        super().__init__(body)

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        self.raw_headers = [(b"cache-control", b"no-store"),
                            (b"content-length", str(len(self.body)).encode("latin-1")),
                            (b"content-type", b"application/json")]


async def fresh_token(api: Api, request: Request) -> Response | None:
    """Most token requests find the token fresh: answered on the event loop from one read.
    A stale token of a live grant is refreshed on the event loop too (keeper.api.refresher).
    Anything else (no grant, a dead grant, the read failing, a grant busy elsewhere) takes
    the handler."""
    appid, openid, min_valid = _token_args(api, request)
    try:
        row = await api.reader.read(appid, openid)
    except Unreadable:
        return None
    if row is None or row.state == REAUTH:
        request.scope["keeper.token_row"] = row  # the handler starts from it
        return None
    if not api.desk.fresh(row, min_valid):
        try:
            t = await api.refresher.token(row.id, min_valid)
        except Exception as e:
            return error_answer(e, request)
        if t is None:
            return None  # the handler reads the row again and waits for the grant
        return _TokenAnswer(openid, t.access_token, t.expires_at, t.scope)
    return _TokenAnswer(openid, row.access_token, row.access_expires_at, row.scope)


@table.endpoint("GET", "/v1/apps/{appid}/users/{openid}/token", "tokens", shortcut=fresh_token)
def token(api: Api, request: Request, body: Any) -> Response:
    appid, openid, min_valid = _token_args(api, request)
    t = api.desk.token(appid, openid, min_valid_s=min_valid,
                       row=request.scope.get("keeper.token_row"))
    return _TokenAnswer(openid, t.access_token, t.expires_at, t.scope)


@table.endpoint("GET", "/v1/apps/{appid}/users/{openid}", "read")
def profile(api: Api, request: Request, body: Any) -> Response:
    return JSONResponse(profile_document(api.store, _grant(api, request)))


@table.endpoint("GET", "/v1/apps/{appid}/users/{openid}/avatar", "read")
def avatar(api: Api, request: Request, body: Any) -> Response:
    grant = _grant(api, request)
    kept = api.store.profile(grant.id) or {}
    sha, relative = kept.get("avatar_sha256"), kept.get("avatar_path")
    if not sha or not relative:
        raise Problem(404, "no_avatar", "keeper holds no avatar for this user")
    etag = f'"{sha}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    wanted = request.headers.get("if-none-match", "")
    if wanted.strip() == "*" or etag in (t.strip().removeprefix("W/") for t in wanted.split(",")):
        return Response(status_code=304, headers=headers)
    try:
        data = (api.config.avatar_dir / relative).read_bytes()
    except OSError:
        raise Problem(404, "no_avatar", "the avatar file is missing; the next sweep "
                                        "fetches it again") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise Problem(404, "no_avatar", "the avatar file is damaged; the next sweep fetches "
                                        "it again")
    return Response(data, media_type=kept.get("avatar_type") or "application/octet-stream",
                    headers=headers)


@table.endpoint("GET", "/v1/reauth", "read")
def reauth_feed(api: Api, request: Request, body: Any) -> Response:
    after = query_int(request, "after", 0, 0, 2**62)
    limit = query_int(request, "limit", FEED_LIMIT, 1, FEED_MAX)
    rows, cursor = api.store.reauth_page(after, limit)
    return JSONResponse({"users": [reauth_row(r) for r in rows], "next": str(cursor)})


@table.endpoint("GET", "/v1/unionids/{unionid}", "read")
def unionid(api: Api, request: Request, body: Any) -> Response:
    rows = api.store.grants_by_unionid(path_id(request, "unionid"))
    return JSONResponse({"grants": rows})

