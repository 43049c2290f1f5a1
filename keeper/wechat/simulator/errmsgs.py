"""WeChat's errcodes as the simulator answers them: ``ERRCODES`` (every errcode keeper must
handle, with the errmsg WeChat sends and what a correct client concludes), and the rid WeChat
appends to every errmsg today."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

ANSWER_ENDPOINTS: tuple[str, ...] = ("code", "refresh", "auth", "userinfo")
_ALL = ANSWER_ENDPOINTS
#: The page the errcode table and the corpus of odd answers cite in their ``source``: WeChat's
#: API as keeper is built against it (its public text, the errcode table, the quirks reported).
REFERENCE = "docs/reference/wechat.md"
UNKNOWN_ERRCODE = 99999  # a code keeper has never heard of


@dataclass(frozen=True)
class Errcode:
    """One errcode: WeChat's errmsg (without its rid), what a client concludes, where it comes."""

    errmsg: str
    expect: str
    endpoints: tuple[str, ...]
    reason: str | None = None  # for reauth: the reason `keeper reauth` lists
    expect_on: Mapping[str, str] = field(default_factory=dict)  # per-endpoint exceptions


#: The ``source`` of every entry of ERRCODES, as the corpus of odd answers cites it.
ERRCODE_SOURCE = (f"{REFERENCE}, the errcode table; errmsg texts as WeChat sends them (meanings "
                  "as in wechatpy's constants.WeChatErrorCode and WxJava's WxMpErrorMsgEnum)")
# Meanings: that page's errcode table. Texts: WeChat's own English errmsg where this project
# knows it.
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

