"""The HTTP plumbing of the API: the route table (each route declared once, on its handler),
errors as ``{"error", "detail"}`` (keeper's exceptions answered in one place), API keys and
scopes, capped JSON bodies, bounded parameters, and :class:`Edge`, the application uvicorn
runs: one ``api.request`` log line per request, and the busiest route served without
Starlette's middleware and router.

Handlers are plain functions run in the thread pool (the store and the WeChat client block);
everything before them (the key, the body) runs on the event loop and never waits on I/O
other than the request itself.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from keeper.api.context import Api
from keeper.api.logins import AppSecretMissing, CodeRejected, ExchangeFailed
from keeper.api.tokens import MustReauthorize, NoGrant, Unavailable
from keeper.core.grant_lines import ID_RE
from keeper.core.timestamps import timestamp
from keeper.errors import ConfigError, DatabaseUnavailable, StoreError
from keeper.log import DirectLogger
from keeper.metrics import process as metrics

#: The access log is written for every request: its line takes the direct path (keeper.log).
log = DirectLogger("keeper.api")


class Problem(Exception):
    """An answer other than success: status, error code, a detail safe to show."""

    def __init__(self, status: int, error: str, detail: str, *,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> Response:
        body = {"error": self.error, "detail": self.detail, **self.extra}
        return JSONResponse(body, self.status, headers=self.headers)


def bad_request(field: str | None, detail: str) -> Problem:
    if field:
        return Problem(400, "bad_request", f"{field}: {detail}", field=field)
    return Problem(400, "bad_request", detail)


def unavailable(error: str, detail: str, retry_after_s: int) -> Problem:
    return Problem(503, error, detail, headers={"Retry-After": str(retry_after_s)})


def path_id(request: Request, name: str) -> str:
    """A path parameter that is an appid, openid or unionid."""
    value = str(request.path_params.get(name, ""))
    if not ID_RE.fullmatch(value):
        raise bad_request(name, "expected printable ASCII without spaces, 1 to 128 characters")
    return value


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    if not request.scope["query_string"]:  # most requests: no query string to parse
        return default
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,19}", raw) or not low <= int(raw) <= high:
        raise bad_request(name, f"expected a whole number from {low} to {high}")
    return int(raw)


async def read_json(request: Request, cap: int) -> dict[str, Any]:
    """The request body as a JSON object, read no further than ``cap`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > cap):
        raise Problem(413, "payload_too_large", f"the body is limited to {cap} bytes")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # A body of no stated type is refused like one of another type: guessing JSON would
    # accept from one client what the contract refuses from the next. No body at all (no
    # Content-Length above 0, no Transfer-Encoding) is not JSON either: 400 below.
    has_body = (length is not None and int(length) > 0) or "transfer-encoding" in request.headers
    if kind != "application/json" and (kind or has_body):
        raise Problem(415, "unsupported_media_type",
                      "send the body with Content-Type: application/json")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise Problem(413, "payload_too_large", f"the body is limited to {cap} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Problem(400, "bad_request", "the client went away") from None
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise bad_request(None, "the body is not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(None, f"the body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise bad_request(None, "the body must be a JSON object")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


Handler = Callable[[Api, Request, Any], Response]
#: A route's shortcut on the event loop: an answer, or ``None`` to run the handler.
Shortcut = Callable[[Api, Request], Awaitable[Response | None]]


class RouteTable:
    """The routes of a module of handlers, each declared once, on its handler: its method and
    path go into the Starlette route served, and the path is also the route's name in the
    access log and the metrics. Iterating gives the routes."""

    def __init__(self) -> None:
        self._routes: list[Route] = []
        #: The routes declared with a shortcut: :class:`Edge` matches them first.
        self.lanes: list[Route] = []

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def endpoint(self, method: str, path: str, scope: str | None, *, body: bool = False,
                 shortcut: Shortcut | None = None, basic: bool = False,
                 ) -> Callable[[Handler], Handler]:
        """Serve the decorated handler at ``method path``: the key checked for ``scope``
        (``None``: no key), the JSON body read when ``body``, then ``fn(api, request, body)``
        in the thread pool. Problems become their answers, and every other failure a 500 that
        names no value.

        ``shortcut``: tried first, on the event loop (no thread hop); the handler runs only
        when it answers ``None``. ``basic``: the key may also come as an HTTP Basic password
        (a page a browser opens), and a 401 asks the browser for it.
        """

        def register(fn: Handler) -> Handler:
            route = Route(path, _serve(fn, path, scope, body=body, shortcut=shortcut,
                                       basic=basic), methods=[method])
            self._routes.append(route)
            if shortcut is not None:
                self.lanes.append(route)
            return fn

        return register


def _serve(fn: Handler, route: str, scope: str | None, *, body: bool,
           shortcut: Shortcut | None, basic: bool) -> Callable[[Request], Awaitable[Response]]:
    """The ASGI side of a handler (see :meth:`RouteTable.endpoint`)."""

    async def handler(request: Request) -> Response:
        request.scope["keeper.route"] = route
        api: Api = request.app.state.api
        try:
            if scope is not None:
                request.scope["keeper.key"] = authenticate(api, request, scope, basic=basic)
            if shortcut is not None:
                answer = await shortcut(api, request)
                if answer is not None:
                    return answer
            payload = await read_json(request, api.config.api.max_body_bytes) if body \
                else None
            return await run_in_threadpool(_answer, fn, api, request, payload)
        except Problem as p:
            return p.response()

    handler.__name__ = fn.__name__
    return handler


def _answer(fn: Handler, api: Api, request: Request, body: Any) -> Response:
    """Run a handler; keeper's exceptions become the answers the OpenAPI document lists."""
    try:
        return fn(api, request, body)
    except Exception as e:
        return error_answer(e, request)


def error_answer(e: Exception, request: Request) -> Response:
    """The answer the OpenAPI document lists for an exception a handler (or a shortcut)
    raised; called while it is being handled (a bug's traceback is logged)."""
    if isinstance(e, Problem):
        return e.response()
    if isinstance(e, NoGrant):
        return Problem(404, "no_grant", str(e)).response()
    if isinstance(e, MustReauthorize):
        r = e.record
        return Problem(409, "reauth_required", str(e),
                       reason=r.reason if r else "other", errcode=r.errcode if r else None,
                       since=timestamp(r.since) if r else None).response()
    if isinstance(e, Unavailable):
        return unavailable(e.code, str(e), e.retry_after_s).response()
    if isinstance(e, CodeRejected):
        return Problem(400, "code_rejected", str(e), errcode=e.errcode).response()
    if isinstance(e, ExchangeFailed):
        return unavailable("wechat_unavailable", str(e), e.retry_after_s).response()
    if isinstance(e, AppSecretMissing):
        # The server's own configuration, not an outage: no Retry-After, as asking again
        # changes nothing until an operator sets the secret and restarts keeper serve. Not
        # logged per request: serve said so once per app at start (app.secret_missing).
        return Problem(500, "app_secret_missing", str(e)).response()
    if isinstance(e, ConfigError):  # WeChat refuses the app (its AppSecret, the IP whitelist)
        log.error("api.app_rejected", error=str(e))
        return unavailable("app_rejected", str(e), 60).response()
    if isinstance(e, DatabaseUnavailable):
        return unavailable("database_unavailable", str(e), 5).response()
    if isinstance(e, StoreError):
        log.error("api.database_error", error=str(e))
        return unavailable("database_unavailable", str(e), 5).response()
    # A bug: the text is left out (it might hold a value being handled).
    log.error("api.crashed", route=request.scope.get("keeper.route"),
              error=type(e).__name__, exc_info=e)
    return Problem(500, "internal_error", "keeper failed; see its log").response()


def authenticate(api: Api, request: Request, scope: str, *, basic: bool = False) -> str:
    """The name of the request's key; 401 without a known key, 403 without the scope."""
    header = request.headers.get("authorization", "")
    kind, _, presented = header.partition(" ")
    challenge = {"WWW-Authenticate": 'Basic realm="keeper", charset="UTF-8"' if basic
                 else 'Bearer realm="keeper"'}
    if basic and kind.lower() == "basic":
        kind, presented = "bearer", _basic_password(presented)
    if kind.lower() != "bearer" or not presented.strip():
        raise Problem(401, "unauthorized", "send Authorization: Bearer KEY", headers=challenge)
    key = api.keys.find(presented.strip())
    if key is None:
        raise Problem(401, "unauthorized", "unknown API key", headers=challenge)
    # The access log names the key of a 403 too: which client asks beyond its scopes.
    request.scope["keeper.key"] = key.name
    if scope not in key.scopes:
        raise Problem(403, "forbidden", f"the key {key.name} lacks the scope {scope}")
    return key.name


def _basic_password(credentials: str) -> str:
    """The password of HTTP Basic credentials (``base64(user:password)``), or ``""``."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


#: Methods counted by name in ``keeper_api_requests_total``; any other is "other" (a label
#: must not take whatever a client sends).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


class Edge:
    """The ASGI application uvicorn runs: Starlette's ``app`` behind what every request goes
    through, one ``api.request`` line (route template, status, time, key name; never a
    header, a query string or a body) and the request's metrics.

    ``lanes``, the routes declared with a shortcut (the token endpoint: most requests), are
    matched here first, by the route's own pattern and methods, and their endpoint (the same
    one Starlette's router would call) is run at once: Starlette's middleware, router and
    exception wrappers cost more than a fresh token's own work. Their endpoints answer every
    error themselves, so those layers had nothing to do for them; a failure still propagates
    to uvicorn, which answers 500, as Starlette's error middleware would have. Any other
    request, a lane's path with another method included, goes to ``app``.
    """

    def __init__(self, app: Starlette, *, lanes: Iterable[Route]) -> None:
        self.app = app
        self.lanes = tuple(lanes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless an answer starts
        try:
            for lane in self.lanes:
                match, child = lane.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    scope["app"] = self.app  # as Starlette sets it: the handlers' Api
                    response = await lane.endpoint(Request(scope, receive, send))
                    status = response.status_code
                    await response(scope, receive, send)
                    return

            async def sending(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = scope.get("keeper.route", "(none)")
            metrics.api_request(method, route, status, seconds)
            params = scope.get("path_params") or {}
            log.info("api.request", method=scope["method"], route=route, status=status,
                     ms=round(seconds * 1000, 2), key_name=scope.get("keeper.key"),
                     appid=_loggable(params.get("appid")),
                     openid=_loggable(params.get("openid")))


def _loggable(value: object) -> str | None:
    """A path id for the log: only when it is one (a bad one is named by the 400 instead)."""
    return value if isinstance(value, str) and ID_RE.fullmatch(value) else None
