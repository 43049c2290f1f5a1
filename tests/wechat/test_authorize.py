"""The simulator's authorize pages (``/connect/qrconnect``, ``/connect/oauth2/authorize``), over
real HTTP: the page a browser shows, the redirect back with a code and the state, the code's
exchange, and the error pages WeChat shows instead of redirecting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from keeper.wechat.simulator import SIM_USERS, Simulator, openid_for, unionid_for

APPID, SECRET = "wx-login-app-1", "login-secret-1"
OTHER_APPID = "wx-login-app-2"
CALLBACK = "http://127.0.0.1:8000/callback"
QR = "/connect/qrconnect"
IN_WECHAT = "/connect/oauth2/authorize"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = Simulator(seed=7)
    s.add_app(APPID, SECRET)
    s.add_app(OTHER_APPID, "login-secret-2")
    s.start()
    yield s
    s.stop()


def login_params(**override: str | None) -> dict[str, str]:
    """A valid website login request, with fields replaced (None drops one)."""
    params: dict[str, str | None] = {"appid": APPID, "redirect_uri": CALLBACK,
                                     "response_type": "code", "scope": "snsapi_login",
                                     "state": "s7Xq9"}
    params.update(override)
    return {key: value for key, value in params.items() if value is not None}


def confirm(sim: Simulator, path: str = QR, *, user: str = "lilei", action: str = "confirm",
            **override: str | None) -> requests.Response:
    """Post the page's form, as the confirm (or deny) button does; redirects not followed."""
    form = {**login_params(**override), "user": user, "action": action}
    return requests.post(sim.url + path, data=form, allow_redirects=False, timeout=5)


def exchange(sim: Simulator, code: str, appid: str = APPID,
             secret: str = SECRET) -> dict[str, Any]:
    answer = requests.get(f"{sim.url}/sns/oauth2/access_token", timeout=5, params={
        "appid": appid, "secret": secret, "code": code, "grant_type": "authorization_code"})
    result: dict[str, Any] = answer.json()
    return result


def test_the_page_names_the_app_and_offers_users_and_a_confirm_button(sim: Simulator) -> None:
    page = requests.get(sim.url + QR, params=login_params(), timeout=5)
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert 'id="confirm"' in page.text and 'id="deny"' in page.text
    assert APPID in page.text
    assert all(user.nickname in page.text for user in SIM_USERS)
    assert f'name="redirect_uri" value="{CALLBACK}"' in page.text
    assert sim.stats()["codes_issued"] == 0  # showing the page issues nothing


def test_confirming_redirects_to_the_callback_with_a_code_that_exchanges(
        sim: Simulator) -> None:
    answer = confirm(sim)
    assert answer.status_code == 302
    location = urlsplit(answer.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == CALLBACK
    query = parse_qs(location.query)
    assert query["state"] == ["s7Xq9"] and set(query) == {"code", "state"}
    tokens = exchange(sim, query["code"][0])
    assert tokens["openid"] == openid_for(APPID, "lilei")
    assert tokens["unionid"] == unionid_for("lilei")
    assert tokens["scope"] == "snsapi_login"
    assert exchange(sim, query["code"][0])["errcode"] == 40163  # single-use, as ever


def test_a_user_who_logged_in_has_a_nickname_and_an_avatar_the_simulator_serves(
        sim: Simulator) -> None:
    code = parse_qs(urlsplit(confirm(sim, user="hanmeimei").headers["Location"]).query)
    tokens = exchange(sim, code["code"][0])
    # UTF-8 under a charset-less text/plain, as WeChat sends it: not requests' .json().
    profile = json.loads(requests.get(f"{sim.url}/sns/userinfo", timeout=5, params={
        "access_token": tokens["access_token"], "openid": tokens["openid"]}).content)
    assert profile["nickname"] == "韩梅梅"
    assert profile["unionid"] == unionid_for("hanmeimei")
    avatar = requests.get(profile["headimgurl"], timeout=5)
    assert avatar.status_code == 200 and avatar.headers["Content-Type"] == "image/png"


def test_one_user_has_an_openid_per_app_and_one_unionid(sim: Simulator) -> None:
    openids, unionids = set(), set()
    for appid in (APPID, OTHER_APPID):
        code = parse_qs(urlsplit(confirm(sim, appid=appid).headers["Location"]).query)
        tokens = exchange(sim, code["code"][0], appid, sim._apps[appid])
        openids.add(tokens["openid"])
        unionids.add(tokens["unionid"])
    assert len(openids) == 2 and unionids == {unionid_for("lilei")}
    assert all(len(openid) == 28 and openid.startswith("o") for openid in openids)


def test_a_callback_with_a_query_keeps_it_and_gets_code_and_state_added(sim: Simulator) -> None:
    answer = confirm(sim, redirect_uri=CALLBACK + "?next=%2Fhome", state=None)
    location = urlsplit(answer.headers["Location"])
    query = parse_qs(location.query, keep_blank_values=True)
    assert query["next"] == ["/home"] and query["state"] == [""] and len(query["code"]) == 1


def test_denying_redirects_with_the_state_only(sim: Simulator) -> None:
    answer = confirm(sim, action="deny")
    assert answer.status_code == 302
    assert answer.headers["Location"] == CALLBACK + "?state=s7Xq9"
    assert sim.stats()["codes_issued"] == 0


@pytest.mark.parametrize(("scope", "userinfo_errcode"),
                         [("snsapi_base", 48001), ("snsapi_userinfo", None)])
def test_the_in_wechat_page_grants_base_or_userinfo(
        sim: Simulator, scope: str, userinfo_errcode: int | None) -> None:
    assert requests.get(sim.url + IN_WECHAT, params=login_params(scope=scope),
                        timeout=5).status_code == 200
    code = parse_qs(urlsplit(confirm(sim, IN_WECHAT, scope=scope).headers["Location"]).query)
    tokens = exchange(sim, code["code"][0])
    assert tokens["scope"] == scope
    profile = requests.get(f"{sim.url}/sns/userinfo", timeout=5, params={
        "access_token": tokens["access_token"], "openid": tokens["openid"]}).json()
    assert profile.get("errcode") == userinfo_errcode


REFUSED: list[tuple[str, dict[str, str | None], str]] = [
    (QR, {"appid": "wx-nobody"}, "AppID"),
    (QR, {"appid": None}, "AppID"),
    (QR, {"redirect_uri": None}, "redirect_uri"),
    (QR, {"redirect_uri": "/callback"}, "redirect_uri"),
    (QR, {"redirect_uri": "javascript:alert(1)"}, "redirect_uri"),
    (QR, {"redirect_uri": "ftp://127.0.0.1/callback"}, "redirect_uri"),
    (QR, {"redirect_uri": "http:///callback"}, "redirect_uri"),
    (QR, {"redirect_uri": CALLBACK + "\r\nSet-Cookie: a=b"}, "redirect_uri"),
    (QR, {"redirect_uri": CALLBACK + "#frag"}, "redirect_uri"),
    (QR, {"redirect_uri": "http://evil@127.0.0.1/callback"}, "redirect_uri"),
    (QR, {"redirect_uri": "http://127.0.0.1:port/callback"}, "redirect_uri"),
    (QR, {"response_type": None}, "response_type"),
    (QR, {"response_type": "token"}, "response_type"),
    (QR, {"scope": None}, "Scope"),
    (QR, {"scope": "snsapi_userinfo"}, "Scope"),
    (QR, {"scope": "snsapi_login,snsapi_base"}, "Scope"),
    (IN_WECHAT, {"scope": "snsapi_login"}, "Scope"),
    (QR, {"state": "a" * 129}, "state"),
    (QR, {"state": "a-b"}, "state"),
]


@pytest.mark.parametrize(("path", "override", "names"), REFUSED,
                         ids=[f"{p.rsplit('/', 1)[1]}-{o}" for p, o, _ in REFUSED])
def test_a_bad_request_gets_an_error_page_and_no_redirect(
        sim: Simulator, path: str, override: dict[str, str | None], names: str) -> None:
    page = requests.get(sim.url + path, params=login_params(**override), timeout=5,
                        allow_redirects=False)
    assert page.status_code == 400 and "Location" not in page.headers
    assert 'id="error"' in page.text and names in page.text
    assert 'id="confirm"' not in page.text
    posted = confirm(sim, path, **override)  # the form's post is checked again
    assert posted.status_code == 400 and "Location" not in posted.headers
    assert sim.stats()["codes_issued"] == 0


def test_an_unknown_user_is_refused(sim: Simulator) -> None:
    answer = confirm(sim, user="mallory")
    assert answer.status_code == 400 and "Location" not in answer.headers
    assert sim.stats()["codes_issued"] == 0


def test_a_redirect_uri_with_markup_is_escaped_on_the_page_and_kept_in_the_redirect(
        sim: Simulator) -> None:
    tricky = CALLBACK + '?x="><script>alert(1)</script>'
    page = requests.get(sim.url + QR, params=login_params(redirect_uri=tricky), timeout=5)
    assert page.status_code == 200
    assert "<script>" not in page.text and "&quot;&gt;&lt;script&gt;" in page.text
    location = confirm(sim, redirect_uri=tricky).headers["Location"]
    assert location.startswith(tricky + "&code=")
