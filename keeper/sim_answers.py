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
  (issue 15): lone surrogates and bytes that are not UTF-8 become U+FFFD; NUL and the other C0
  control characters (0x14, backspace...) are removed, but tab and newline kept; everything
  else (private-use characters included) kept. ``note`` says where a field
  may differ.
- ``valid``: ``/sns/auth`` says the access token is valid.
- ``malformed``: not a usable answer (not JSON, an empty object, a token missing, a lifetime of
  0): keep what is stored, treat it as transient. These entries never change the simulator's
  state (except that a code is consumed, as WeChat does), so nothing stored goes stale.
- ``mismatch``: the answer names another user: refuse it, store nothing from it.
- errcode conclusions, from the table of the reference: ``transient``, ``quota``, ``config``
  (the operator must fix the app's configuration), ``app_banned`` (48004: pause the app),
  ``bug`` (a parameter keeper sent is wrong: never re-authorize), ``login_again`` (a code is
  spent: the user must log in again), ``reauth`` (``fields["reason"]`` as in ``keeper reauth``),
  ``refresh_access`` (the access token is stale: refresh it), ``stop_token`` (40003: that token
  is not this user's), ``no_profile`` (48001: never read the profile of this grant),
  ``profile_refused`` (50001/50002: no profile for now, keep the tokens), ``unknown``
  (transient with backoff, logged with its code).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field

ANSWER_ENDPOINTS: tuple[str, ...] = ("code", "refresh", "auth", "userinfo")
_ALL = ANSWER_ENDPOINTS
_REF = "reference/wechat-oauth2.md"
UNKNOWN_ERRCODE = 99999  # a code keeper has never heard of


@dataclass(frozen=True)
class Errcode:
    """One errcode: WeChat's errmsg (without its rid), what a client concludes, where it comes."""

    errmsg: str
    expect: str
    endpoints: tuple[str, ...]
    reason: str | None = None  # for reauth: the reason `keeper reauth` lists
    expect_on: Mapping[str, str] = field(default_factory=dict)  # per-endpoint exceptions


_ERRCODE_SOURCE = (f"{_REF}, the errcode table; errmsg texts as WeChat sends them (meanings as in "
                   "wechatpy's constants.WeChatErrorCode and WxJava's WxMpErrorMsgEnum)")
# Meanings: the reference's table. Texts: WeChat's own English errmsg where this project knows it.
ERRCODES: dict[int, Errcode] = {
    -1: Errcode("system error", "transient", _ALL),
    40001: Errcode("invalid credential, access_token is invalid or not latest", "refresh_access",
                   ("code", "auth", "userinfo"), expect_on={"code": "config"}),
    40002: Errcode("invalid grant_type", "bug", ("code", "refresh")),
    40003: Errcode("invalid openid", "stop_token", ("auth", "userinfo")),
    40013: Errcode("invalid appid", "config", ("code", "refresh")),
    40014: Errcode("invalid access_token", "refresh_access", ("auth", "userinfo")),
    40029: Errcode("invalid code", "login_again", ("code",)),
    40030: Errcode("invalid refresh_token", "reauth", ("refresh",), "refresh_token_invalid"),
    40035: Errcode("invalid args", "bug", _ALL),
    40097: Errcode("invalid args", "bug", _ALL),
    40125: Errcode("invalid appsecret", "config", ("code",)),
    40163: Errcode("code been used", "login_again", ("code",)),
    40164: Errcode("invalid ip 203.0.113.7 ipv6 ::ffff:203.0.113.7, not in whitelist", "config",
                   ("code", "refresh")),
    41001: Errcode("access_token missing", "bug", ("auth", "userinfo")),
    41002: Errcode("appid missing", "bug", ("code", "refresh")),
    41003: Errcode("refresh_token missing", "bug", ("refresh",)),
    41004: Errcode("appsecret missing", "bug", ("code",)),
    41005: Errcode("media data missing", "bug", _ALL),
    41006: Errcode("media_id missing", "bug", _ALL),
    41007: Errcode("sub_menu data missing", "bug", _ALL),
    41008: Errcode("missing code", "bug", ("code",)),
    41009: Errcode("missing openid", "bug", ("auth", "userinfo")),
    42001: Errcode("access_token expired", "refresh_access", ("auth", "userinfo")),
    42002: Errcode("refresh_token expired", "reauth", ("refresh",), "refresh_token_expired"),
    42003: Errcode("code expired", "login_again", ("code",)),
    42007: Errcode("the access_token and refresh_token are invalid, user need to reauthorize",
                   "reauth", ("refresh", "auth", "userinfo"), "authorization_revoked"),
    45009: Errcode("reach max api daily quota limit", "quota", _ALL),
    45011: Errcode("api minute-quota reach limit mustslow down this moment", "quota", _ALL),
    48001: Errcode("api unauthorized", "no_profile", ("userinfo",)),
    48004: Errcode("api forbidden for irregularities, view detail on mp.weixin.qq.com",
                   "app_banned", _ALL),
    50001: Errcode("user unauthorized", "profile_refused", ("userinfo",)),
    50002: Errcode("user limited", "profile_refused", ("userinfo",)),
    UNKNOWN_ERRCODE: Errcode("simulated unknown error", "unknown", _ALL),
}


def errmsg(errcode: int) -> str:
    """WeChat's text for ``errcode``, without the rid (one for unknown codes too)."""
    known = ERRCODES.get(errcode)
    return known.errmsg if known else f"simulated errcode {errcode}"


def make_rid(now: float, rng: random.Random) -> str:
    """A request id as WeChat appends to errmsg: the Unix time in hex, then two random parts
    (``6302e9ee-763afa00-0dae2ea0`` was reported in August 2022: 0x6302e9ee is that date)."""
    return f"{int(now) & 0xFFFFFFFF:08x}-{rng.getrandbits(32):08x}-{rng.getrandbits(32):08x}"


def with_rid(text: str, rid: str) -> str:
    """``text`` with WeChat's current suffix: ``invalid code, rid: 6543b2e1-0a1b2c3d-4e5f6a7b``."""
    return f"{text}, rid: {rid}"


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


_PROFILE_SOURCES = f"{_REF}, 'Profiles as they really come'"
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
        source=("issue 15, section 3 (NUL escaped in a nickname, seen by this project); cf. "
                "chanxuehong/wechat PR #187 (2016): '\\u0007' inside a nickname"),
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
        source=f"{_REF}, 'In short': sex has been seen as a string",
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
        source=(f"{_REF}, 'In short'; wechatpy issue #147 (2016): a userinfo answer with "
                "'content-type': 'application/json; encoding=utf-8'"),
    ),
    OddAnswer(
        "profile_other_openid", ("userinfo",),
        _profile("小明".encode(), openid=b"{other_openid}"), _TEXT, "mismatch",
        note="a profile naming a user who did not ask: not this user's profile",
        source="issue 15, section 3 ('an answer whose openid differs'): defensive, no report known",
    ),
    OddAnswer(
        "tokens_application_json", ("code", "refresh"), _TOKENS, _ENCODING, "tokens",
        {"expires_in": 7200}, perform=True,
        source=(f"{_REF}, 'In short': JSON sent as text/plain, sometimes "
                "'application/json; encoding=utf-8'"),
    ),
    OddAnswer(
        "tokens_numbers_as_strings", ("code", "refresh"),
        _TOKENS.replace(b"{expires_in}", b'"{expires_in}"').replace(
            b'"is_snapshotuser":{is_snapshotuser}', b'"is_snapshotuser":"{is_snapshotuser}"'),
        _TEXT, "tokens", {"expires_in": 7200, "is_snapshotuser": 0}, perform=True,
        note="'0' is a string: a client that takes its truth value marks a virtual user",
        source=(f"{_REF}, 'In short' (numbers seen as strings) and 'Virtual users' "
                "(is_snapshotuser); issue 15, section 3"),
    ),
    OddAnswer(
        "tokens_other_openid", ("refresh",),
        _TOKENS.replace(b"{openid}", b"{other_openid}").replace(
            b"{access_token}", b"{fake_access_token}").replace(
            b"{refresh_token}", b"{fake_refresh_token}"),
        _TEXT, "mismatch",
        note="tokens for a user who did not ask; the asker's tokens are untouched",
        source="issue 15, section 3 ('an answer whose openid differs'): defensive, no report known",
    ),
    OddAnswer(
        "tokens_missing_access_token", ("code", "refresh"),
        _TOKENS.replace(b'"access_token":"{access_token}",', b""), _TEXT, "malformed",
        source="issue 15, section 3 (a refresh/code answer missing access_token): defensive",
    ),
    OddAnswer(
        "tokens_missing_refresh_token", ("code", "refresh"),
        _TOKENS.replace(b'"refresh_token":"{refresh_token}",', b""), _TEXT, "malformed",
        source="issue 15, section 3 (a refresh/code answer missing refresh_token): defensive",
    ),
    OddAnswer(
        "tokens_expires_in_zero", ("code", "refresh"),
        _TOKENS.replace(b"{expires_in}", b"0"), _TEXT, "malformed",
        note="an access token that is dead on arrival",
        source="issue 15, section 3 (expires_in 0): defensive",
    ),
    OddAnswer(
        "auth_empty_object", ("auth",), b"{}", _TEXT, "malformed",
        note="no errcode at all: not a 'valid' (errcode 0)",
        source="issue 15, section 3 ('{}' from /sns/auth): defensive",
    ),
    OddAnswer(
        "not_json", _ALL, b"system busy, please try again later\n", _TEXT, "malformed",
        source="issue 15, section 3 (a body that is not JSON at all)",
    ),
    OddAnswer(
        "empty_body", _ALL, b"", _TEXT, "malformed",
        source="issue 15, section 3 (a body that is not JSON at all): the empty case",
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
        source=f"{_REF}, 'In short' (application/json; encoding=utf-8; errmsg with a rid)",
    ),
]


def _errcode_answer(code: int, info: Errcode) -> OddAnswer:
    body = json.dumps({"errcode": code, "errmsg": with_rid(info.errmsg, "{rid}")},
                      ensure_ascii=False, separators=(",", ":")).encode()
    return OddAnswer(f"errcode_{code}", info.endpoints, body, _TEXT, info.expect,
                     {"reason": info.reason} if info.reason else {}, source=_ERRCODE_SOURCE,
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
