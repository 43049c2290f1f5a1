"""What WeChat really answers, for the simulator: errmsg texts, rids, and a corpus of odd bodies.

``ERRCODES`` holds every errcode keeper must handle, with the text WeChat sends (its own English
errmsg where known) and what a correct client concludes from it. ``ODD_ANSWERS`` is a corpus of
real-shaped answers that a client meets in the wild: raw control characters inside JSON
strings, bytes that are not UTF-8, lone surrogates, NUL, private-use characters, numbers sent as
strings, JSON under odd content types, answers lacking a token or naming another user, and
bodies that are not JSON at all. Each entry can be served to one user by
``Simulator.script(openid, endpoint, name)`` (or ``POST /_sim/script``, or ``keeper simulate
--script``), so that tests and developers can replay it.

A corpus entry's ``body`` is the exact bytes sent, with placeholders filled at serve time:
``{openid}`` (the asking user), ``{other_openid}`` (a user who did not ask), ``{access_token}``,
``{refresh_token}``, ``{scope}``, ``{expires_in}``, ``{is_snapshotuser}``, ``{headimgurl}``,
``{unionid_field}``
(``"unionid":"…",`` or nothing), ``{fake_access_token}`` and ``{fake_refresh_token}`` (tokens
WeChat never issued) and ``{rid}``. Everything else, raw bytes included, is sent as written.

``expect`` names what a correct client must conclude:

- ``tokens``: a good token answer; ``fields`` holds values it must read (e.g. ``is_snapshotuser``
  0 from ``"0"``). Entries that ``perform`` did the real work first (a code is consumed, a
  refresh done and, where rotation is on, the refresh token rotated): the tokens in the body are
  the live ones, and a client that drops them loses the grant.
- ``profile``: a profile; ``fields`` are its text fields *after cleaning*, the rule being
  keeper/core/clean.py's: lone surrogates and bytes that are not UTF-8 become U+FFFD; NUL and
  the other C0 control characters (0x14, backspace...) are removed, but tab and newline kept;
  everything else (private-use characters included) kept. ``note`` says where a field may
  differ.
- ``valid``: ``/sns/auth`` says the access token is valid.
- ``malformed``: not a usable answer (not JSON, an empty object, a token missing, a lifetime of
  0): keep what is stored, treat it as transient. These entries never change the simulator's
  state (except that a code is consumed, as WeChat does), so nothing stored goes stale.
- ``mismatch``: the answer names another user: refuse it, store nothing from it.
- errcode conclusions, from the errcode table of docs/reference/wechat.md: ``transient``,
  ``quota``, ``config`` (the operator must fix the app's configuration), ``app_banned``
  (48004: pause the app),
  ``bug`` (a parameter keeper sent is wrong: never re-authorize), ``login_again`` (a code is
  spent: the user must log in again), ``reauth`` (``fields["reason"]`` as in ``keeper reauth``),
  ``refresh_access`` (the access token is stale: refresh it), ``stop_token`` (40003: that token
  is not this user's), ``no_profile`` (48001: never read the profile of this grant),
  ``profile_refused`` (50001/50002: no profile for now, keep the tokens), ``unknown``
  (transient with backoff, logged with its code).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field

from keeper.wechat.simulator.errmsgs import (
    ANSWER_ENDPOINTS,
    ERRCODE_SOURCE,
    ERRCODES,
    REFERENCE,
    Errcode,
    with_rid,
)


@dataclass(frozen=True)
class OddAnswer:
    """One real-shaped answer: see the module docstring for the placeholders and ``expect``."""

    name: str
    endpoints: tuple[str, ...]
    body: bytes
    content_type: str
    expect: str
    fields: Mapping[str, object] = field(default_factory=dict)
    _: KW_ONLY
    source: str
    perform: bool = False  # the real call's effect happens, and the body carries its result
    note: str = ""
    errcode: int | None = None  # for the entries of ERRCODES
    expect_on: Mapping[str, str] = field(default_factory=dict)

    def conclusion(self, endpoint: str) -> str:
        """What a correct client concludes when ``endpoint`` answers this."""
        return self.expect_on.get(endpoint, self.expect)

    def render(self, values: Mapping[str, str]) -> bytes:
        """The body with its placeholders filled; each value is escaped as in a JSON string."""
        body = self.body
        for key, value in values.items():
            placeholder = b"{" + key.encode() + b"}"
            if placeholder in body:
                raw = (value if key == "unionid_field"
                       else json.dumps(value, ensure_ascii=False)[1:-1])
                body = body.replace(placeholder, raw.encode())
        return body


def unionid_field(unionid: str | None) -> str:
    """The ``{unionid_field}`` placeholder's value."""
    return "" if not unionid else f'"unionid":{json.dumps(unionid, ensure_ascii=False)},'


_TEXT = "text/plain"
_ENCODING = "application/json; encoding=utf-8"
_TOKENS = (b'{"access_token":"{access_token}","expires_in":{expires_in},'
           b'"refresh_token":"{refresh_token}","openid":"{openid}","scope":"{scope}",'
           b'{unionid_field}"is_snapshotuser":{is_snapshotuser}}')


def _profile(nickname: bytes, sex: bytes = b"0", province: bytes = b"", city: bytes = b"",
             country: bytes = b"", openid: bytes = b"{openid}") -> bytes:
    return (b'{"openid":"' + openid + b'",{unionid_field}"nickname":"' + nickname + b'","sex":'
            + sex + b',"province":"' + province + b'","city":"' + city + b'","country":"'
            + country + b'","headimgurl":"{headimgurl}","privilege":[]}')


def _cleaned(nickname: str, sex: object = 0, province: str = "", city: str = "",
             country: str = "") -> dict[str, object]:
    return {"nickname": nickname, "sex": sex, "province": province, "city": city,
            "country": country}


_PROFILE_SOURCES = f"{REFERENCE}, 'Profiles as they really come'"
#: Answers no report is known of, refused on principle: an answer that names another user or
#: lacks a token would otherwise overwrite a live grant.
_CHECKED = "docs/explanation/wechat-answers.md, 'Every answer is checked against the question'"
_ODD: list[OddAnswer] = [
    OddAnswer(
        "profile_control_chars", ("userinfo",),
        _profile("\x14小明".encode(), b"1", "广\n东".encode(), b"\x08", "中国".encode()),
        _TEXT, "profile", _cleaned("小明", 1, "广\n东", "", "中国"),
        perform=True,
        source=(f"{_PROFILE_SOURCES}; raw 0x14 before a nickname: lanrion/weixin_authorize PR "
                "#52 (2015) and ihaolin/common issue #4 (Jackson 'CTRL-CHAR, code 20'); a raw "
                "backspace as the city and a newline in the province: node-webot/co-wechat-api "
                "issue #63 (2017)"),
    ),
    OddAnswer(
        "profile_gbk_nickname", ("userinfo",),
        _profile("张三".encode("gbk"), b"1", "广东".encode(), "深圳".encode(), "中国".encode()),
        _TEXT, "profile", {"sex": 1, "province": "广东", "city": "深圳", "country": "中国"},
        perform=True,
        note=("the nickname is GBK bytes, not UTF-8: any text without a crash (U+FFFD in their "
              "place, or a GB18030 reading '张三'); the other fields exactly as given"),
        source=(f"{_PROFILE_SOURCES}; node-webot/co-wechat-api issue #63 (2017): a nickname "
                "shown as 'Íõ¾ü', GBK bytes read as Latin-1"),
    ),
    OddAnswer(
        "profile_lone_surrogate", ("userinfo",), _profile(b"\\u5c0f\\u660e\\ud83d"),
        _TEXT, "profile", _cleaned("小明\ufffd"), perform=True,
        note="an emoji cut in half: a lone surrogate escape, which UTF-8 cannot encode",
        source=(f"{_PROFILE_SOURCES} (truncated emoji, seen by this project); cf. "
                "tvrcgo/weixin-redpack PR #3 (allowSurrogateChars for WeChat nicknames)"),
    ),
    OddAnswer(
        "profile_nul", ("userinfo",), _profile("小\\u0000明".encode()), _TEXT, "profile",
        _cleaned("小明"), perform=True,
        note="PostgreSQL refuses NUL in text: it must go before the profile is stored",
        source=("docs/explanation/wechat-answers.md, 'Cleaning, in one place' (NUL escaped in "
                "a nickname, seen by this project); cf. chanxuehong/wechat PR #187 (2016): "
                "'\\u0007' inside a nickname"),
    ),
    OddAnswer(
        "profile_private_use", ("userinfo",), _profile("\ue412小明\ue056".encode(), b"2"),
        _TEXT, "profile", _cleaned("\ue412小明\ue056", 2), perform=True,
        note="old (SoftBank) emoji as private-use characters: valid text, kept as they are",
        source=(f"{_PROFILE_SOURCES}; wechatpy issue #147 (2016): a nickname of U+E13C "
                "U+E41D U+E537 where the user saw emoji"),
    ),
    OddAnswer(
        "profile_sex_as_string", ("userinfo",),
        _profile(b"Tom", b'"1"', "广东".encode(), "深圳".encode(), "中国".encode()),
        _TEXT, "profile", _cleaned("Tom", 1, "广东", "深圳", "中国"), perform=True,
        source=f"{REFERENCE}, 'In short': sex has been seen as a string",
    ),
    OddAnswer(
        "profile_empty_region", ("userinfo",), _profile("微信用户".encode()), _TEXT, "profile",
        _cleaned("微信用户"), perform=True,
        note="the common case since late 2021, and the simulator's default profile",
        source=(f"{_PROFILE_SOURCES}: since late 2021 most reads give sex 0 and empty "
                "province/city/country (WeChat's 2021 announcement on user-info interfaces)"),
    ),
    OddAnswer(
        "profile_application_json", ("userinfo",), _profile("小明".encode()), _ENCODING,
        "profile", _cleaned("小明"), perform=True,
        source=(f"{REFERENCE}, 'In short'; wechatpy issue #147 (2016): a userinfo answer "
                "with 'content-type': 'application/json; encoding=utf-8'"),
    ),
    OddAnswer(
        "profile_other_openid", ("userinfo",),
        _profile("小明".encode(), openid=b"{other_openid}"), _TEXT, "mismatch",
        note="a profile naming a user who did not ask: not this user's profile",
        source=f"{_CHECKED} (an answer whose openid differs): defensive, no report known",
    ),
    OddAnswer(
        "tokens_application_json", ("code", "refresh"), _TOKENS, _ENCODING, "tokens",
        {"expires_in": 7200}, perform=True,
        source=(f"{REFERENCE}, 'In short': JSON sent as text/plain, sometimes "
                "'application/json; encoding=utf-8'"),
    ),
    OddAnswer(
        "tokens_numbers_as_strings", ("code", "refresh"),
        _TOKENS.replace(b"{expires_in}", b'"{expires_in}"').replace(
            b'"is_snapshotuser":{is_snapshotuser}', b'"is_snapshotuser":"{is_snapshotuser}"'),
        _TEXT, "tokens", {"expires_in": 7200, "is_snapshotuser": 0}, perform=True,
        note="'0' is a string: a client that takes its truth value marks a virtual user",
        source=(f"{REFERENCE}, 'In short' (numbers seen as strings) and 'Virtual users' "
                "(is_snapshotuser)"),
    ),
    OddAnswer(
        "tokens_other_openid", ("refresh",),
        _TOKENS.replace(b"{openid}", b"{other_openid}").replace(
            b"{access_token}", b"{fake_access_token}").replace(
            b"{refresh_token}", b"{fake_refresh_token}"),
        _TEXT, "mismatch",
        note="tokens for a user who did not ask; the asker's tokens are untouched",
        source=f"{_CHECKED} (an answer whose openid differs): defensive, no report known",
    ),
    OddAnswer(
        "tokens_missing_access_token", ("code", "refresh"),
        _TOKENS.replace(b'"access_token":"{access_token}",', b""), _TEXT, "malformed",
        source=f"{_CHECKED} (a refresh/code answer missing access_token): defensive",
    ),
    OddAnswer(
        "tokens_missing_refresh_token", ("code", "refresh"),
        _TOKENS.replace(b'"refresh_token":"{refresh_token}",', b""), _TEXT, "malformed",
        source=f"{_CHECKED} (a refresh/code answer missing refresh_token): defensive",
    ),
    OddAnswer(
        "tokens_expires_in_zero", ("code", "refresh"),
        _TOKENS.replace(b"{expires_in}", b"0"), _TEXT, "malformed",
        note="an access token that is dead on arrival",
        source=f"{_CHECKED} (expires_in 0): defensive",
    ),
    OddAnswer(
        "auth_empty_object", ("auth",), b"{}", _TEXT, "malformed",
        note="no errcode at all: not a 'valid' (errcode 0)",
        source=f"{_CHECKED} ('{{}}' from /sns/auth): defensive",
    ),
    OddAnswer(
        "not_json", ANSWER_ENDPOINTS, b"system busy, please try again later\n", _TEXT,
        "malformed",
        source=f"{_CHECKED} (a body that is not JSON at all)",
    ),
    OddAnswer(
        "empty_body", ANSWER_ENDPOINTS, b"", _TEXT, "malformed",
        source=f"{_CHECKED} (a body that is not JSON at all): the empty case",
    ),
    OddAnswer(
        "errmsg_rid_without_comma", ("auth", "userinfo"),
        b'{"errcode":40003,"errmsg":"invalid openid rid: {rid}"}', _TEXT, "stop_token",
        errcode=40003,
        source=("rxrw/daily_morning issues #16 and #80 (2022): 'invalid openid rid: "
                "6302e9ee-763afa00-0dae2ea0', the rid without a comma"),
    ),
    OddAnswer(
        "errmsg_hints_req_id", ("code",),
        b'{"errcode":40029,"errmsg":"invalid code, hints: [ req_id: UdICunNre-o_pNZa ]"}',
        _TEXT, "login_again", errcode=40029,
        source=("binarywang/WxJava issue #1626 (2020) and xu-li/cordova-plugin-wechat issue "
                "#266 (2016): the older 'hints: [ req_id: … ]' suffix"),
    ),
    OddAnswer(
        "error_application_json", ("refresh",),
        b'{"errcode":40030,"errmsg":"invalid refresh_token, rid: {rid}"}', _ENCODING, "reauth",
        {"reason": "refresh_token_invalid"}, errcode=40030,
        source=(f"{REFERENCE}, 'In short' (application/json; encoding=utf-8; errmsg with a "
                "rid)"),
    ),
]


def _errcode_answer(code: int, info: Errcode) -> OddAnswer:
    body = json.dumps({"errcode": code, "errmsg": with_rid(info.errmsg, "{rid}")},
                      ensure_ascii=False, separators=(",", ":")).encode()
    return OddAnswer(f"errcode_{code}", info.endpoints, body, _TEXT, info.expect,
                     {"reason": info.reason} if info.reason else {}, source=ERRCODE_SOURCE,
                     errcode=code, expect_on=info.expect_on)


ODD_ANSWERS: list[OddAnswer] = _ODD + [_errcode_answer(c, i) for c, i in ERRCODES.items()]
ODD_BY_NAME: dict[str, OddAnswer] = {answer.name: answer for answer in ODD_ANSWERS}
assert len(ODD_BY_NAME) == len(ODD_ANSWERS), "corpus names must be unique"


def describe(answer: OddAnswer) -> dict[str, object]:
    """A JSON-shaped description of one corpus entry (its body as text, bytes escaped)."""
    return {
        "name": answer.name, "endpoints": list(answer.endpoints),
        "content_type": answer.content_type, "expect": answer.expect,
        "expect_on": dict(answer.expect_on), "fields": dict(answer.fields),
        "perform": answer.perform, "errcode": answer.errcode, "note": answer.note,
        "source": answer.source, "body": answer.body.decode("utf-8", "backslashreplace"),
    }
