"""The WeChat OAuth2 client: four endpoints over ``requests``, every answer classified.

Everything a caller sees is a :class:`TokenAnswer`, a dict, or an exception from
:mod:`keeper.errors`. No ``requests`` exception escapes and none is chained (their text holds
the URL, and the URL holds tokens): failures are raised after the ``except`` block has ended.
"""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from keeper import __version__
from keeper.errors import (
    ApiError,
    AppConfigRejected,
    BadCode,
    NoProfile,
    QuotaExceeded,
    ReauthRequired,
    StaleAccessToken,
    TransientApiError,
)
from keeper.models import TokenAnswer
from keeper.policy import reauth_reason

PATHS = {
    "code": "/sns/oauth2/access_token",
    "refresh": "/sns/oauth2/refresh_token",
    "auth": "/sns/auth",
    "userinfo": "/sns/userinfo",
}
#: The largest answer read; WeChat's are under 2 KiB.
MAX_BODY_BYTES = 256 * 1024
_CHUNK = 16 * 1024
_NO_PROXIES: dict[str, str] = {}
_SECRET_PARAMS = ("secret", "code", "refresh_token", "access_token")


def read_capped(resp: requests.Response, max_bytes: int, chunk: int = _CHUNK) -> bytes | None:
    """A streamed body read in chunks; ``None`` (and the rest unread) once past ``max_bytes``.

    Leaving the ``with`` block of an unfinished response closes its connection, so a hostile
    server cannot make keeper read or buffer more than ``max_bytes``.
    """
    chunks: list[bytes] = []
    size = 0
    for part in resp.iter_content(chunk):
        size += len(part)
        if size > max_bytes:
            return None
        chunks.append(part)
    return b"".join(chunks)


def classify(endpoint: str, errcode: int, errmsg: str = "") -> ApiError:
    """The exception for WeChat's ``errcode`` on ``endpoint`` (see the reference's table)."""
    detail = errmsg[:120] or "error"
    if errcode in (45009, 45011):
        return QuotaExceeded(endpoint, errcode, detail)
    if errcode in (40030, 42002, 42007):
        return ReauthRequired(endpoint, errcode, detail, reason=reauth_reason(errcode))
    if errcode in (40013, 40125, 40164) or (errcode == 40001 and endpoint == "code"):
        return AppConfigRejected(endpoint, errcode, detail)
    if endpoint == "code" and errcode in (40029, 40163, 42003):
        return BadCode(endpoint, errcode, detail)
    if errcode in (40014, 42001, 40001) and endpoint in ("auth", "userinfo"):
        return StaleAccessToken(endpoint, errcode, detail)
    if errcode == 40003 and endpoint in ("auth", "userinfo"):
        # The access token is not this openid's: the stored grant is unusable.
        return ReauthRequired(endpoint, errcode, detail, reason=reauth_reason(errcode))
    if errcode in (48001, 50001, 50002):
        return NoProfile(endpoint, errcode, detail)
    if 41001 <= errcode <= 41009:
        return TransientApiError(endpoint, errcode, f"missing parameter (a keeper bug): {detail}")
    if errcode == -1:
        return TransientApiError(endpoint, errcode, "system busy")
    return TransientApiError(endpoint, errcode, f"unknown errcode: {detail}")


class WeChatClient:
    """Thread-safe: each worker thread gets its own ``requests`` connection pool.

    A call goes straight to the thread's ``HTTPAdapter``: ``Session.send`` around it adds cookie
    jars, hooks and redirect handling that keeper does not use and that cost a fifth of a
    call's CPU time (measured on loopback: 0.61 ms per call as built here, 0.69 ms with
    ``PreparedRequest.prepare``, about 0.9 ms through ``Session.get``).
    """

    def __init__(
        self, *, api_base: str, connect_timeout_s: float, read_timeout_s: float,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.max_body_bytes = max_body_bytes
        self._local = threading.local()
        self._headers = {"User-Agent": f"keeper/{__version__}", "Accept": "application/json"}
        self._adapters: list[HTTPAdapter] = []
        self._lock = threading.Lock()

    def _adapter(self) -> HTTPAdapter:
        adapter: HTTPAdapter | None = getattr(self._local, "adapter", None)
        if adapter is None:
            # One kept-alive connection per thread is all a thread can use.
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            self._local.adapter = adapter
            with self._lock:
                self._adapters.append(adapter)
        return adapter

    def close(self) -> None:
        """Close every thread's connection pool."""
        with self._lock:
            adapters, self._adapters = self._adapters, []
        for adapter in adapters:
            adapter.close()

    def call(self, endpoint: str, params: dict[str, str]) -> dict[str, Any]:
        """GET one endpoint; the answer's JSON object on success (errcode absent or 0)."""
        failure: str | None = None
        status = 0
        body = b""
        content_type = ""
        try:
            # Built by hand: the URL is api_base (validated at start) plus urlencode()d
            # parameters, so PreparedRequest.prepare's re-parsing and re-quoting has nothing
            # to do but costs a tenth of a call.
            request = requests.PreparedRequest()
            request.method = "GET"
            request.url = f"{self.api_base}{PATHS[endpoint]}?{urlencode(params)}"
            request.headers = CaseInsensitiveDict(self._headers)
            request.body = None
            # No proxies from the environment, no redirects: what a service should do.
            with self._adapter().send(
                request, stream=True, timeout=self.timeout, verify=True, cert=None,
                proxies=_NO_PROXIES,
            ) as resp:
                status = resp.status_code
                content_type = resp.headers.get("Content-Type", "")
                capped = read_capped(resp, self.max_body_bytes)
                if capped is None:
                    failure = f"answer larger than {self.max_body_bytes} bytes"
                else:
                    body = capped
        except requests.Timeout:
            failure = "timeout"
        except requests.ConnectionError:
            failure = "connection failed"
        except requests.RequestException as e:
            failure = f"request failed ({type(e).__name__})"
        if failure is not None:
            raise TransientApiError(endpoint, None, failure)
        return self._parse(endpoint, status, content_type, body, params)

    def _parse(
        self, endpoint: str, status: int, content_type: str, body: bytes, params: dict[str, str]
    ) -> dict[str, Any]:
        if status >= 500:
            raise TransientApiError(endpoint, None, f"HTTP {status}")
        if status != 200:
            raise TransientApiError(endpoint, None, f"HTTP {status} (is api_base right?)")
        text = body.decode("utf-8", "replace").strip()
        if "html" in content_type.lower() or text.startswith("<"):
            raise TransientApiError(endpoint, None, "answer is HTML, not JSON")
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise TransientApiError(endpoint, None, "answer is not a JSON object (truncated?)")
        errcode = data.get("errcode", 0)
        if not isinstance(errcode, int) or isinstance(errcode, bool):
            try:
                errcode = int(errcode)
            except (TypeError, ValueError):
                raise TransientApiError(endpoint, None, "answer has a malformed errcode") from None
        if errcode != 0:
            errmsg = str(data.get("errmsg", ""))
            for key in _SECRET_PARAMS:  # WeChat may echo what it was sent
                if params.get(key):
                    errmsg = errmsg.replace(params[key], "[redacted]")
            raise classify(endpoint, errcode, errmsg)
        return data

    def _token_answer(self, endpoint: str, data: dict[str, Any]) -> TokenAnswer:
        access, refresh, openid = (data.get(k) for k in ("access_token", "refresh_token", "openid"))
        if not (isinstance(access, str) and isinstance(refresh, str) and isinstance(openid, str)):
            raise TransientApiError(endpoint, None, "answer lacks a token or the openid")
        if not (access and refresh and openid):
            raise TransientApiError(endpoint, None, "answer has an empty token or openid")
        try:
            expires_in = int(data.get("expires_in", 7200))
        except (TypeError, ValueError):
            expires_in = 7200
        unionid = data.get("unionid")
        return TokenAnswer(
            access_token=access,
            expires_in_s=max(0, expires_in),
            refresh_token=refresh,
            openid=openid,
            scope=str(data.get("scope") or ""),
            unionid=str(unionid).strip() or None if unionid else None,
            is_snapshotuser=bool(data.get("is_snapshotuser")),
        )

    def exchange_code(self, appid: str, secret: str, code: str) -> TokenAnswer:
        """``/sns/oauth2/access_token``. Never retried by keeper: a code is single-use."""
        data = self.call(
            "code",
            {"appid": appid, "secret": secret, "code": code, "grant_type": "authorization_code"},
        )
        return self._token_answer("code", data)

    def refresh(self, appid: str, refresh_token: str) -> TokenAnswer:
        """``/sns/oauth2/refresh_token``. The AppSecret is not needed and never sent."""
        data = self.call(
            "refresh",
            {"appid": appid, "grant_type": "refresh_token", "refresh_token": refresh_token},
        )
        return self._token_answer("refresh", data)

    def check(self, access_token: str, openid: str) -> None:
        """``/sns/auth``: returns when the access token is valid, raises otherwise."""
        self.call("auth", {"access_token": access_token, "openid": openid})

    def userinfo(self, access_token: str, openid: str, lang: str) -> dict[str, Any]:
        """``/sns/userinfo``: the profile answer as WeChat gave it."""
        return self.call("userinfo", {"access_token": access_token, "openid": openid, "lang": lang})
