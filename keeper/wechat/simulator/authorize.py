"""WeChat's authorize pages, where a user lets an app log them in, and the redirect back.

``/connect/qrconnect`` is what a website shows for "Log in with WeChat" (Open Platform website
apps; scope ``snsapi_login``): WeChat's page holds a QR code the user scans and confirms on
their phone. ``/connect/oauth2/authorize`` is an Official Account's page opened inside WeChat
(``snsapi_base`` or ``snsapi_userinfo``; WeChat passes ``snsapi_base`` through silently, the
simulator shows its page for both). Here one HTML page stands in for both: it names the app and
offers a picker of simulated users, a ``confirm`` button and a ``deny`` button.

Confirming redirects (302) to ``redirect_uri?code=CODE&state=STATE`` with a fresh code for the
chosen user; denying to ``redirect_uri?state=STATE`` (no code), as WeChat's website-login
document describes. Bad requests get an error page and no redirect, as WeChat does: an unknown
appid, a missing or bad ``redirect_uri`` (only absolute http(s) URLs, printable ASCII, no
fragment or user info: the redirect can only ever go to that URL, with no header smuggled in),
``response_type`` other than ``code``, a scope the page does not grant, a ``state`` longer
than 128 bytes or outside ``[A-Za-z0-9]`` (the documented limits). WeChat also refuses a
redirect_uri outside the app's registered callback domain; the simulator has no such setting.
The texts follow the ones developers report WeChat showing; the status (400) is the
simulator's, so that a client can tell.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from keeper.wechat.simulator.replies import Reply
from keeper.wechat.simulator.state import SimState

#: The page's path -> the scopes it grants.
LOGIN_PAGES: dict[str, frozenset[str]] = {
    "/connect/qrconnect": frozenset({"snsapi_login"}),
    "/connect/oauth2/authorize": frozenset({"snsapi_base", "snsapi_userinfo"}),
}
_STATE_RE = re.compile(r"^[A-Za-z0-9]{0,128}$")
_PRINTABLE_RE = re.compile(r"^[\x21-\x7e]+$")  # no space, no CR/LF: nothing to smuggle
_MAX_REDIRECT_URI = 2048


@dataclass(frozen=True)
class SimUser:
    """A simulated WeChat user offered on the authorize page; ``key`` names them in forms."""

    key: str
    nickname: str


#: The users the page offers, the first preselected. Their nicknames are not ASCII on purpose:
#: a client must carry UTF-8 from WeChat's JSON to its own pages.
SIM_USERS: tuple[SimUser, ...] = (
    SimUser("lilei", "李雷"),
    SimUser("hanmeimei", "韩梅梅"),
    SimUser("jim", "Jim Green"),
)
_USERS = {user.key: user for user in SIM_USERS}


def _digest(text: str, length: int) -> str:
    raw = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return raw[:length]


def openid_for(appid: str, user_key: str) -> str:
    """The user's openid in that app: one per (app, user), stable across runs, shaped like
    WeChat's (28 characters starting with "o")."""
    return "o" + _digest(f"openid\0{appid}\0{user_key}", 27)


def unionid_for(user_key: str) -> str:
    """The user's unionid: the same in every app (the simulator is one open platform account)."""
    return "o6_bm" + _digest(f"unionid\0{user_key}", 23)


class _Refused(ValueError):
    """A request the page refuses: the text WeChat shows."""


def login_page(sim: SimState, method: str, path: str, query: str, body: bytes) -> Reply:
    """One of ``LOGIN_PAGES``: GET, the page for a valid request; POST (the page's form), the
    redirect. Not API calls: never counted, forced or failed."""
    form = dict(parse_qsl(body.decode("utf-8", "replace") if method == "POST" else query,
                          keep_blank_values=True))
    try:
        appid, redirect_uri, scope, state = _check_request(sim, path, form)
        if method == "GET":
            return _page(path, appid, redirect_uri, scope, state)
        user = _USERS.get(form.get("user", ""))
        if user is None:
            raise _Refused("user 参数错误 (no such simulated user)")
    except _Refused as refused:
        return _error_page(str(refused))
    if form.get("action") == "deny":
        return _redirect(redirect_uri, {"state": state})
    code = sim.issue_code(appid=appid, openid=openid_for(appid, user.key), scope=scope,
                          unionid=unionid_for(user.key), profile={"nickname": user.nickname})
    return _redirect(redirect_uri, {"code": code, "state": state})


def _check_request(sim: SimState, path: str, form: dict[str, str]) -> tuple[str, str, str, str]:
    """(appid, redirect_uri, scope, state) of a request WeChat would accept, in WeChat's order
    of checks; raises _Refused with the text of its error page."""
    appid = form.get("appid", "")
    if not sim.knows_app(appid):
        raise _Refused("AppID 参数错误 (unknown appid)")
    redirect_uri = form.get("redirect_uri", "")
    if not _valid_redirect_uri(redirect_uri):
        raise _Refused("redirect_uri 参数错误 (an absolute http(s) URL is required)")
    if form.get("response_type") != "code":
        raise _Refused("response_type 参数错误 (must be code)")
    scopes = set(form.get("scope", "").split(","))
    if not scopes <= LOGIN_PAGES[path] or "" in scopes:
        raise _Refused(f"Scope 参数错误或没有 Scope 权限 (this page grants "
                       f"{', '.join(sorted(LOGIN_PAGES[path]))})")
    state = form.get("state", "")
    if not _STATE_RE.match(state):
        raise _Refused("state 参数错误 (at most 128 letters and digits)")
    return appid, redirect_uri, ",".join(sorted(scopes)), state


def _valid_redirect_uri(uri: str) -> bool:
    if not uri or len(uri) > _MAX_REDIRECT_URI or not _PRINTABLE_RE.match(uri):
        return False
    try:
        parts = urlsplit(uri)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port that is not a number
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok
            and not parts.fragment and "@" not in parts.netloc)


def _redirect(redirect_uri: str, params: dict[str, str]) -> Reply:
    """A 302 to redirect_uri with params added to its query (the only place it ever goes)."""
    parts = urlsplit(redirect_uri)
    extra = urlencode(params)
    location = urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query
                                         else extra))
    return Reply(302, "text/html; charset=utf-8", b"", headers=(("Location", location),))


def _html(title: str, body: str, status: int = 200) -> Reply:
    page = (f'<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body></html>\n")
    return Reply(status, "text/html; charset=utf-8", page.encode())


def _error_page(text: str) -> Reply:
    return _html("微信登录 - 错误",
                 f'<h1>微信登录</h1>\n<p id="error">{html.escape(text)}</p>', 400)


def _page(path: str, appid: str, redirect_uri: str, scope: str, state: str) -> Reply:
    fields = {"appid": appid, "redirect_uri": redirect_uri, "response_type": "code",
              "scope": scope, "state": state}
    hidden = "\n".join(f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
                       for name, value in fields.items())
    options = "\n".join(f'<option value="{user.key}">{html.escape(user.nickname)}</option>'
                        for user in SIM_USERS)
    body = f"""<h1>微信登录</h1>
<p id="app">Log in to <b>{html.escape(appid)}</b> with WeChat (scope {html.escape(scope)})</p>
<div id="qrcode" style="width:160px;height:160px;border:1px solid #888">
  WeChat shows a QR code here: the user scans it and confirms on their phone.</div>
<form method="post" action="{path}">
{hidden}
<label>Simulated user <select id="user" name="user">
{options}
</select></label>
<button id="confirm" type="submit" name="action" value="confirm">确认登录 (confirm)</button>
<button id="deny" type="submit" name="action" value="deny">拒绝 (deny)</button>
</form>"""
    return _html("微信登录", body)
