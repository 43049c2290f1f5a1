"""WeChat's answers as they really come: parsed, cleaned, checked against the question.

Each odd body below is one reported in the wild (docs/reference/wechat.md, "Profiles as they
really come" and "In short"); the property tests feed the parser anything.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keeper.core.clean import clean_text, flag, whole_number
from keeper.core.models import Grant, Profile
from keeper.errors import AnswerMismatch, ApiError, MalformedAnswer
from keeper.wechat.client import parse_body, token_answer

NOW = datetime(2026, 11, 29, tzinfo=UTC)
JSON = "application/json; encoding=utf-8"
OK = {"access_token": "AT1", "refresh_token": "RT1", "openid": "o1", "scope": "snsapi_login",
      "expires_in": 7200}


def profile(body: bytes, content_type: str = "text/plain") -> Profile:
    return Profile.from_answer(parse_body("userinfo", 200, content_type, body), NOW)


@pytest.mark.parametrize(("body", "field", "expected"), [
    # 0x14 before a nickname, a backspace as the city, a newline inside the province.
    (b'{"openid":"o1","nickname":"\x14Nick"}', "nickname", "Nick"),
    (b'{"openid":"o1","city":"\x08"}', "city", ""),
    (b'{"openid":"o1","province":"Guang\ndong"}', "province", "Guang\ndong"),
    (b'{"openid":"o1","nickname":"a\tb"}', "nickname", "a\tb"),
    # A GBK-encoded nickname (bytes that are not UTF-8).
    ('{"openid":"o1","nickname":"张三"}'.encode("gbk"), "nickname", "\ufffd" * 4),
    # A truncated emoji: a lone surrogate escape; a whole pair stays one emoji.
    (b'{"openid":"o1","nickname":"hi\\ud83d"}', "nickname", "hi\ufffd"),
    (b'{"openid":"o1","nickname":"\\ud83d\\ude00"}', "nickname", "\U0001f600"),
    # An escaped NUL, and a raw one.
    (b'{"openid":"o1","nickname":"a\\u0000b"}', "nickname", "ab"),
    (b'{"openid":"o1","nickname":"a\x00b"}', "nickname", "ab"),
    # A private-use character (an old emoji) is kept.
    (b'{"openid":"o1","nickname":"\xee\x90\x92"}', "nickname", "\ue412"),
    # Numbers as strings, and the empty region of most profile reads since late 2021.
    (b'{"openid":"o1","sex":"1"}', "sex", 1),
    (b'{"openid":"o1","sex":0,"province":"","city":"","country":""}', "sex", 0),
    (b'{"openid":"o1","sex":0,"province":"","city":"","country":""}', "province", ""),
    (b'\xef\xbb\xbf{"openid":"o1","nickname":"bom"}', "nickname", "bom"),
])
def test_odd_profile_bodies_are_parsed_and_cleaned(body: bytes, field: str, expected: object,
                                                   ) -> None:
    assert getattr(profile(body), field) == expected


@pytest.mark.parametrize(("sent", "kept"), [
    # WeChat's integer (0 unknown, 1 male, 2 female), as sent or as a string of it.
    (b"0", 0), (b"1", 1), (b"2", 2), (b'"0"', 0), (b'"1"', 1), (b'" 2 "', 2), (b"2.0", 2),
    (b'"1.0"', 1),
    # Out of range or not a number: WeChat's own "unknown".
    (b"3", 0), (b"-1", 0), (b'"x"', 0), (b'"12"', 0), (b"1.5", 0), (b"true", 0), (b"[1]", 0),
    (b'{"a":1}', 0),
    # Not said: null.
    (b"null", None), (b'""', None), (b'"  "', None),
])
def test_sex_is_wechats_integer_whatever_form_it_came_in(sent: bytes, kept: int | None) -> None:
    got = profile(b'{"openid":"o1","sex":' + sent + b"}").sex
    assert got == kept and type(got) is type(kept)
    assert profile(b'{"openid":"o1"}').sex is None


@pytest.mark.parametrize("content_type", ["text/plain", JSON, "application/json",
                                          "text/plain; charset=utf-8", ""])
def test_json_comes_under_any_content_type(content_type: str) -> None:
    assert profile(b'{"openid":"o1","nickname":"N"}', content_type).nickname == "N"


def test_an_errmsg_with_a_rid_suffix_is_classified_by_its_code() -> None:
    body = b'{"errcode":40030,"errmsg":"invalid refresh_token, rid: 6543b2e1-0a1b2c3d-4e5f6a7b"}'
    with pytest.raises(ApiError) as info:
        parse_body("refresh", 200, "text/plain", body)
    assert info.value.errcode == 40030 and "rid:" in info.value.detail


def test_an_errcode_sent_as_a_string_counts() -> None:
    with pytest.raises(ApiError) as info:
        parse_body("refresh", 200, "text/plain", b'{"errcode":"42002","errmsg":"x"}')
    assert info.value.errcode == 42002


def test_an_echoed_secret_never_reaches_the_error_even_when_cut() -> None:
    token = "RT-" + "s" * 300
    body = json.dumps({"errcode": 40030, "errmsg": f"invalid refresh_token {token}"}).encode()
    with pytest.raises(ApiError) as info:
        parse_body("refresh", 200, "text/plain", body, redact=(token,))
    assert "sss" not in str(info.value)


@pytest.mark.parametrize("body", [b"", b"null", b"[1,2]", b'"text"', b"{", b"<html>busy</html>",
                                  b"[" * 100_000, b'{"errcode": null}', b'{"errcode": "x"}',
                                  b'{"errcode": 1e999}'])
def test_only_a_body_that_is_not_a_json_object_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        parse_body("refresh", 200, "text/plain", body)


@pytest.mark.parametrize(("change", "why"), [
    ({"access_token": None}, "lacks access_token"),
    ({"refresh_token": ""}, "lacks refresh_token"),
    ({"openid": None}, "lacks openid"),
    ({"expires_in": None}, "positive expires_in"),
    ({"expires_in": 0}, "positive expires_in"),
    ({"expires_in": "-5"}, "positive expires_in"),
    ({"access_token": "A" * 513}, "malformed access_token"),
    ({"openid": "o 1"}, "malformed openid"),
])
def test_a_token_answer_without_what_it_must_carry_is_malformed(
    change: dict[str, Any], why: str
) -> None:
    with pytest.raises(MalformedAnswer, match=why):
        token_answer("refresh", {**OK, **change})


def test_a_token_answer_reads_numbers_and_flags_as_sent() -> None:
    answer = token_answer("code", {**OK, "expires_in": "7200", "is_snapshotuser": "0",
                                   "scope": "snsapi_login, snsapi_userinfo"})
    assert answer.expires_in_s == 7200 and answer.is_snapshotuser is False
    assert answer.scope == "snsapi_login,snsapi_userinfo"
    assert token_answer("code", {**OK, "is_snapshotuser": 1}).is_snapshotuser is True


def test_flags_and_numbers() -> None:
    assert [flag(v) for v in (1, "1", True, 0, "0", "", None, 2, "yes")] == [
        True, True, True, False, False, False, False, False, False]
    assert [whole_number(v) for v in (7200, "7200", 7200.0, " 5 ", 1.5, "x", True, None)] == [
        7200, 7200, 7200, 5, None, None, None, None]


def test_website_logins_read_profiles_and_base_alone_does_not() -> None:
    def g(scope: str) -> Grant:
        return Grant(id=1, appid="wx", openid="o", unionid=None, scope=scope, access_token="a",
                     refresh_token="r", access_expires_at=NOW, refresh_issued_at=NOW)

    assert g("snsapi_login").wants_profile and g("snsapi_userinfo").wants_profile
    assert g("snsapi_base,snsapi_login").wants_profile and g(" snsapi_login ").wants_profile
    assert not g("snsapi_base").wants_profile and not g("").wants_profile


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
_fields = st.sampled_from(["openid", "nickname", "sex", "province", "city", "country",
                           "headimgurl", "privilege", "unionid", "errcode", "errmsg",
                           "access_token", "refresh_token", "expires_in", "scope",
                           "is_snapshotuser"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=300), content_type=st.sampled_from(["text/plain", JSON, "",
                                                                   "text/html"]))
def test_any_bytes_get_a_classified_outcome(body: bytes, content_type: str) -> None:
    _outcome(body, content_type)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=st.dictionaries(_fields, _json_values, max_size=10), ascii_only=st.booleans())
def test_any_json_object_gets_a_classified_outcome(answer: dict[str, Any],
                                                   ascii_only: bool) -> None:
    _outcome(json.dumps(answer, ensure_ascii=ascii_only, allow_nan=True)
             .encode("utf-8", "surrogatepass"), "text/plain")


def _outcome(body: bytes, content_type: str) -> None:
    """Every endpoint's parse of ``body``: a result or an ApiError, nothing else; and
    whatever is kept is clean text."""
    for endpoint in ("code", "refresh", "auth", "userinfo"):
        try:
            data = parse_body(endpoint, 200, content_type, body)
        except ApiError:
            continue
        if endpoint in ("code", "refresh"):
            with contextlib.suppress(MalformedAnswer):
                token_answer(endpoint, data)
        if endpoint == "userinfo":
            p = Profile.from_answer(data, NOW)
            assert p.sex in (None, 0, 1, 2)
            for value in (p.nickname, p.province, p.city, p.country, p.headimgurl,
                          p.unionid, *p.privilege):
                if value is not None:
                    assert value == clean_text(value)
                    value.encode("utf-8")  # storable: no lone surrogate, no NUL
                    assert "\x00" not in value


def test_a_mismatch_is_a_malformed_answer_kind() -> None:
    assert issubclass(AnswerMismatch, MalformedAnswer)
