"""A client no one here wrote, wechatpy's ``WeChatOAuth``, against the simulator, unchanged.

Only its ``API_BASE_URL`` (a class attribute, overridden on the instance) points at the
simulator's loopback URL. If the simulator drifted from WeChat in a way a real client notices,
these tests would say so.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from wechatpy.exceptions import WeChatClientException, WeChatOAuthException
from wechatpy.oauth import WeChatOAuth

from keeper.wechat.simulator import ERRCODES, ODD_ANSWERS, Simulator
from tests.wechat.test_simulator import cleaned

APPID, SECRET = "wx0123456789abcdef", "wechatpy-secret"
REDIRECT = "https://www.example.com/wechat/callback"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    sim = Simulator(seed=3)
    sim.add_app(APPID, SECRET)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def oauth(sim: Simulator) -> WeChatOAuth:
    client = WeChatOAuth(APPID, SECRET, REDIRECT, scope="snsapi_login")
    client.API_BASE_URL = sim.url + "/"  # the library joins base and "sns/..." itself
    return client


def login(sim: Simulator, oauth: WeChatOAuth, openid: str = "o-wechatpy",
          **code_options: object) -> dict[str, object]:
    code = sim.issue_code(appid=APPID, openid=openid, unionid=f"u-{openid}",
                          **code_options)  # type: ignore[arg-type]
    answer: dict[str, object] = oauth.fetch_access_token(code)
    return answer


def test_the_four_calls_work_unchanged(sim: Simulator, oauth: WeChatOAuth) -> None:
    # A website's QR login (snsapi_login): wechatpy's own qrconnect_url asks for that scope.
    assert "scope=snsapi_login" in oauth.qrconnect_url
    answer = login(sim, oauth)
    assert (answer["openid"], answer["scope"], answer["unionid"], answer["expires_in"]) == (
        "o-wechatpy", "snsapi_login", "u-o-wechatpy", 7200)
    assert (oauth.open_id, oauth.access_token, oauth.refresh_token) == (
        "o-wechatpy", answer["access_token"], answer["refresh_token"])

    assert oauth.check_access_token() is True
    assert oauth.check_access_token("o-wechatpy", str(answer["access_token"])) is True

    profile = oauth.get_user_info()
    assert profile["openid"] == "o-wechatpy" and profile["unionid"] == "u-o-wechatpy"
    # Today's common case: sex 0, no region.
    assert (profile["sex"], profile["province"], profile["city"], profile["country"]) == (
        0, "", "", "")
    assert profile["headimgurl"].startswith(f"{sim.url}/mmopen/")
    assert profile["privilege"] == []

    # The access token is live: refreshing keeps it and pushes its expiry out.
    refreshed = oauth.refresh_access_token(str(answer["refresh_token"]))
    assert (refreshed["access_token"], refreshed["refresh_token"], refreshed["openid"]) == (
        answer["access_token"], answer["refresh_token"], "o-wechatpy")
    assert refreshed["expires_in"] == 7200 and oauth.expires_in == 7200
    stats = sim.stats()["endpoints"]
    assert isinstance(stats, dict)
    assert {name: figures["ok"] for name, figures in stats.items()} == {
        "code": 1, "refresh": 1, "auth": 2, "userinfo": 1}
    assert stats["refresh"]["secret_sent"] == 0  # wechatpy's refresh sends no secret either


def test_rotation_and_a_newer_login_as_wechatpy_sees_them(
        sim: Simulator, oauth: WeChatOAuth) -> None:
    sim.configure(rotate_refresh_tokens=True)
    first = login(sim, oauth)
    rotated = oauth.refresh_access_token(str(first["refresh_token"]))
    assert rotated["refresh_token"] != first["refresh_token"]
    with pytest.raises(WeChatOAuthException) as old:
        oauth.refresh_access_token(str(first["refresh_token"]))
    assert old.value.errcode == 40030
    # A newer login of the same user kills the older refresh token.
    newer = login(sim, oauth)
    with pytest.raises(WeChatOAuthException) as replaced:
        oauth.refresh_access_token(str(rotated["refresh_token"]))
    assert replaced.value.errcode == 40030
    assert oauth.refresh_access_token(str(newer["refresh_token"]))["openid"] == "o-wechatpy"


def test_the_legacy_profile_in_english(sim: Simulator, oauth: WeChatOAuth) -> None:
    login(sim, oauth, "o-old", legacy_profile=True)
    profile = oauth.get_user_info(lang="en")
    assert (profile["sex"], profile["province"], profile["city"], profile["country"]) == (
        1, "Guangdong", "Shenzhen", "CN")


def test_errors_raise_wechatpys_own_exception(sim: Simulator, oauth: WeChatOAuth) -> None:
    code = sim.issue_code(appid=APPID, openid="o-1")
    oauth.fetch_access_token(code)
    with pytest.raises(WeChatOAuthException) as used:
        oauth.fetch_access_token(code)
    assert used.value.errcode == 40163
    assert used.value.errmsg.startswith("code been used, rid: ")
    with pytest.raises(WeChatOAuthException) as invalid:
        oauth.fetch_access_token("not-a-code")
    assert (invalid.value.errcode, invalid.value.errmsg.split(",")[0]) == (40029, "invalid code")
    # wechatpy's check_access_token raises for an invalid token rather than returning False.
    with pytest.raises(WeChatOAuthException) as stale:
        oauth.check_access_token("o-1", "not-a-token")
    assert stale.value.errcode == 40001
    wrong = WeChatOAuth(APPID, "wrong-secret", REDIRECT, scope="snsapi_login")
    wrong.API_BASE_URL = oauth.API_BASE_URL
    with pytest.raises(WeChatOAuthException) as secret:
        wrong.fetch_access_token(sim.issue_code(appid=APPID, openid="o-2"))
    assert secret.value.errcode == 40125
    base = login(sim, oauth, "o-base", scope="snsapi_base")
    with pytest.raises(WeChatOAuthException) as unauthorized:
        oauth.get_user_info("o-base", str(base["access_token"]))
    assert unauthorized.value.errcode == 48001


@pytest.mark.parametrize("errcode", sorted(ERRCODES))
def test_every_errcode_of_the_table_reaches_wechatpy(
        sim: Simulator, oauth: WeChatOAuth, errcode: int) -> None:
    answer = login(sim, oauth)
    sim.script("o-wechatpy", "userinfo", errcode)
    sim.script("o-wechatpy", "refresh", errcode)
    for call in (oauth.get_user_info, lambda: oauth.refresh_access_token(
            str(answer["refresh_token"]))):
        with pytest.raises(WeChatOAuthException) as raised:
            call()
        assert raised.value.errcode == errcode
        assert raised.value.errmsg.startswith(ERRCODES[errcode].errmsg + ", rid: ")
        assert isinstance(raised.value, WeChatClientException)


@pytest.mark.parametrize("name", [odd.name for odd in ODD_ANSWERS
                                  if odd.expect == "profile" and "userinfo" in odd.endpoints])
def test_wechatpy_reads_the_odd_profiles(sim: Simulator, oauth: WeChatOAuth, name: str) -> None:
    """wechatpy decodes UTF-8 dropping bad bytes and parses JSON with strict=False: it reads
    every odd profile of the corpus (it does no cleaning: NUL, 0x14 and lone surrogates stay)."""
    login(sim, oauth)
    sim.script("o-wechatpy", "userinfo", name)
    profile = oauth.get_user_info()
    assert profile["openid"] == "o-wechatpy"
    fields = next(odd for odd in ODD_ANSWERS if odd.name == name).fields
    # What wechatpy returns, cleaned by the corpus's rule, is what the corpus expects.
    assert {key: cleaned(profile[key]) if key != "sex" else int(profile[key])
            for key in fields} == fields


@pytest.mark.parametrize("name", ["tokens_application_json", "tokens_numbers_as_strings"])
def test_wechatpy_takes_odd_token_answers_that_carry_the_live_tokens(
        sim: Simulator, oauth: WeChatOAuth, name: str) -> None:
    sim.configure(rotate_refresh_tokens=True)
    first = login(sim, oauth)
    sim.script("o-wechatpy", "refresh", name)
    answer = oauth.refresh_access_token(str(first["refresh_token"]))
    assert int(answer["expires_in"]) == 7200  # "7200", a string, in one of them
    assert sim.current_tokens()["o-wechatpy"] == (answer["access_token"],
                                                  answer["refresh_token"])


def test_gateway_failures_reach_wechatpy(sim: Simulator, oauth: WeChatOAuth) -> None:
    login(sim, oauth)
    sim.script("o-wechatpy", "userinfo", "502")
    with pytest.raises(WeChatOAuthException) as gateway:
        oauth.get_user_info()
    assert gateway.value.errcode is None and gateway.value.response.status_code == 502
    # A body that is not JSON escapes wechatpy as a bare ValueError: the library's behaviour.
    sim.script("o-wechatpy", "userinfo", "not_json")
    with pytest.raises(ValueError):
        oauth.get_user_info()
    assert oauth.get_user_info()["openid"] == "o-wechatpy"  # the script is used up
