"""An example website: "Log in with WeChat", then the user's nickname and avatar, all through
keeper's HTTP API (`keeper serve`). Configured by environment variables (README.md).

The login code goes from WeChat's redirect straight to keeper (POST /v1/grants), which
exchanges it and keeps the grant alive; the site keeps only the openid in its session. The API
key stays on the server: the browser gets the avatar from /avatar, which the site proxies.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import requests
from flask import Flask, Response, redirect, render_template, request, session, url_for
from jinja2 import DictLoader

log = logging.getLogger("website")

TEMPLATES = {
    "layout.html": """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Example site</title></head>
<body><h1>Example site</h1>{% block body %}{% endblock %}</body></html>""",
    "login.html": """{% extends "layout.html" %}{% block body %}
<p id="message">{{ message }}</p>
<p><a id="login" href="{{ url_for('login') }}">Log in with WeChat</a></p>{% endblock %}""",
    "profile.html": """{% extends "layout.html" %}{% block body %}
{% if profile.nickname %}<p>Hello, <b id="nickname">{{ profile.nickname }}</b></p>
{% else %}<p id="pending">keeper has not read your profile yet: reload in a moment.</p>{% endif %}
{% if profile.avatar_sha256 %}<img id="avatar" src="{{ url_for('avatar') }}" alt="avatar"
  width="132" height="132">{% endif %}
<form method="post" action="{{ url_for('logout') }}"><button id="logout">Log out</button></form>
{% endblock %}""",
}


class _HideCode(logging.Filter):
    """Werkzeug's access log writes the request line, and the callback's carries the code."""

    _CODE = re.compile(r"([?&])code=[^&\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "code=" in message:
            record.msg, record.args = self._CODE.sub(r"\1code=[hidden]", message), ()
        return True


_HIDE_CODE = _HideCode()


def create_app(config: Mapping[str, str] | None = None) -> Flask:
    """The site; ``config`` replaces the environment (KEEPER_API, KEEPER_API_KEY,
    WECHAT_APPID, WECHAT_OPEN_BASE, SECRET_KEY)."""
    env = os.environ if config is None else config
    missing = [name for name in ("KEEPER_API_KEY", "WECHAT_APPID", "SECRET_KEY")
               if not env.get(name)]
    if missing:
        raise RuntimeError(f"set {', '.join(missing)} (see README.md)")
    api = env.get("KEEPER_API", "http://127.0.0.1:8790").rstrip("/")
    appid = env["WECHAT_APPID"]
    open_base = env.get("WECHAT_OPEN_BASE", "https://open.weixin.qq.com").rstrip("/")
    keeper = requests.Session()
    keeper.headers["Authorization"] = f"Bearer {env['KEEPER_API_KEY']}"

    app = Flask(__name__)
    app.config.update(SECRET_KEY=env["SECRET_KEY"], SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax")  # Lax: sent on WeChat's redirect back
    app.jinja_loader = DictLoader(TEMPLATES)
    if _HIDE_CODE not in logging.getLogger("werkzeug").filters:
        logging.getLogger("werkzeug").addFilter(_HIDE_CODE)

    def call(method: str, path: str, **kwargs: Any) -> requests.Response | None:
        """keeper's answer, or None when it cannot be reached (the exception's text is not
        logged: only its type)."""
        try:
            return keeper.request(method, api + path, timeout=10, **kwargs)
        except requests.RequestException as exc:
            log.warning("keeper unreachable: %s", type(exc).__name__)
            return None

    def user_path() -> str:
        return f"/v1/apps/{quote(appid, safe='')}/users/{quote(session['openid'], safe='')}"

    def page(message: str, status: int) -> tuple[str, int]:
        return render_template("login.html", message=message), status

    @app.after_request
    def no_referrer(response: Response) -> Response:
        response.headers["Referrer-Policy"] = "no-referrer"  # the callback URL holds the code
        return response

    @app.get("/")
    def home() -> Any:
        if "openid" not in session:
            return page("Welcome.", 200)
        answer = call("GET", user_path())
        if answer is not None and answer.status_code == 404:
            session.clear()  # keeper forgot this user: log in again
            return page("Please log in again.", 200)
        if answer is None or answer.status_code != 200:
            return page("Your profile is not available right now: try again.", 503)
        return render_template("profile.html", profile=answer.json())

    @app.get("/login")
    def login() -> Any:
        session["state"] = state = secrets.token_hex(16)  # CSRF: checked on the callback
        query = urlencode({"appid": appid, "redirect_uri": url_for("callback", _external=True),
                           "response_type": "code", "scope": "snsapi_login", "state": state})
        return redirect(f"{open_base}/connect/qrconnect?{query}#wechat_redirect")

    @app.get("/callback")
    def callback() -> Any:
        expected = session.pop("state", None)
        if not expected or not secrets.compare_digest(expected, request.args.get("state", "")):
            return page("This login link is stale: please log in again.", 400)
        code = request.args.get("code")
        if not code:
            return page("You cancelled the login.", 200)
        answer = call("POST", "/v1/grants", json={"appid": appid, "code": code})
        if answer is not None and answer.status_code == 201:
            session["openid"] = answer.json()["openid"]
            return redirect(url_for("home"))
        error = _error_code(answer)
        if error == "code_rejected":
            return page("That login did not work: please log in again.", 400)
        if answer is None or answer.status_code == 503:
            return page("WeChat is not answering right now: try again in a minute.", 503)
        log.error("keeper refused the login: HTTP %s %s", answer.status_code, error)
        return page("The login failed on our side: try again later.", 502)

    @app.get("/avatar")
    def avatar() -> Any:
        if "openid" not in session:
            return Response(status=404)
        etag = request.headers.get("If-None-Match")
        answer = call("GET", user_path() + "/avatar",
                      headers={"If-None-Match": etag} if etag else {})
        if answer is None:
            return Response(status=503)
        if answer.status_code not in (200, 304):
            return Response(status=404 if answer.status_code == 404 else 502)
        proxied = Response(answer.content, status=answer.status_code,
                           content_type=answer.headers.get("Content-Type"))
        if "ETag" in answer.headers:
            proxied.headers["ETag"] = answer.headers["ETag"]
        proxied.headers["Cache-Control"] = "private, no-cache"  # one user's image: revalidate
        return proxied

    @app.post("/logout")
    def logout() -> Any:
        session.clear()
        return redirect(url_for("home"))

    return app


def _error_code(answer: requests.Response | None) -> str:
    """The ``error`` of keeper's JSON error body, "" when there is none."""
    try:
        return str(answer.json().get("error", "")) if answer is not None else ""
    except (ValueError, AttributeError):
        return ""


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=5000)
