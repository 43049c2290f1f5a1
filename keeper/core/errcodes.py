"""Every errcode WeChat's OAuth2 endpoints are known to answer, and what keeper does about it.

One table, read by the WeChat client (:func:`keeper.wechat.client.classify`), tested row by row
against the simulator, and shown in docs/reference/errcodes.md. Sources: WeChat's web-login
and Open Platform pages, the error tables of wechatpy (``wechatpy/exceptions.py`` users) and
WxJava (``WxMpErrorMsgEnum``), gathered in docs/reference/wechat.md. Pure code.

Kinds, from the user's point of view:

- ``reauth``: WeChat's definitive answer that the grant is dead; the user must log in again;
- ``bad_code``: a login code that cannot be used; the user must log in again (never retried);
- ``stale_token``: the access token is invalid or expired; refresh it and retry once;
- ``profile_only``: the profile cannot be read for this user now; the tokens are kept;
- ``app``: WeChat refuses the app itself; pause that app, alert, touch no user;
- ``quota``: the app's quota is used up; pause the endpoint until its window rolls;
- ``transient``: try again later with backoff; never a re-authorization;
- ``bug``: keeper sent a bad or missing parameter; an error event, backoff, never a
  re-authorization.
"""

from __future__ import annotations

from dataclasses import dataclass

REAUTH = "reauth"
BAD_CODE = "bad_code"
STALE_TOKEN = "stale_token"  # noqa: S105 - a kind's name, not a secret
PROFILE_ONLY = "profile_only"
APP = "app"
QUOTA = "quota"
TRANSIENT = "transient"
BUG = "bug"
KINDS = (REAUTH, BAD_CODE, STALE_TOKEN, PROFILE_ONLY, APP, QUOTA, TRANSIENT, BUG)

ENDPOINTS = ("code", "refresh", "auth", "userinfo")
_TOKEN_CALLS = ("code", "refresh")
_TOKEN_USERS = ("auth", "userinfo")


@dataclass(frozen=True)
class Meaning:
    """What ``codes`` mean on ``endpoints``, and what keeper does."""

    codes: tuple[int, ...]
    endpoints: tuple[str, ...]
    kind: str
    meaning: str
    action: str


TABLE: tuple[Meaning, ...] = (
    Meaning((40030,), ENDPOINTS, REAUTH, "invalid refresh_token (sometimes before day 30)",
            "record refresh_token_invalid; the user must log in again"),
    Meaning((42002,), ENDPOINTS, REAUTH, "refresh_token expired",
            "record refresh_token_expired; the user must log in again"),
    Meaning((42007,), ENDPOINTS, REAUTH,
            "the user changed their password or revoked the grant: both tokens are invalid",
            "record authorization_revoked; the user must log in again"),
    Meaning((40003,), _TOKEN_USERS, REAUTH, "invalid openid: the token is not this user's",
            "record other (40003); stop using the token; the user must log in again"),
    Meaning((40029, 40163, 42003), ("code",), BAD_CODE,
            "invalid, already used or expired login code",
            "never retried; the user must log in again"),
    Meaning((40001, 40014, 42001), _TOKEN_USERS, STALE_TOKEN,
            "access token invalid or expired",
            "refresh the access token, then retry once; a second refusal is transient"),
    Meaning((48001, 50001, 50002), ("userinfo",), PROFILE_ONLY,
            "api unauthorized (snsapi_base, a snapshot user), the user has not authorized "
            "this api, or the user is limited",
            "keep the tokens; no profile for now (48001: never again for this grant); "
            "the errcode is recorded with the profile"),
    Meaning((40001,), ("code",), APP, "AppSecret wrong (invalid credential)",
            "pause the app, alert (wechat.app_rejected); touch no user"),
    Meaning((40013, 40125, 40164, 48004), ENDPOINTS, APP,
            "invalid appid, invalid AppSecret, caller IP not whitelisted, or the API is "
            "banned for the app",
            "pause the app, alert (wechat.app_rejected); touch no user"),
    Meaning((45009,), ENDPOINTS, QUOTA, "daily quota reached",
            "pause the endpoint for the app until midnight, China time; alert"),
    Meaning((45011,), ENDPOINTS, QUOTA, "minute quota reached",
            "pause the endpoint for the app until the window rolls"),
    Meaning((-1,), ENDPOINTS, TRANSIENT, "system busy",
            "back off and retry later (never for a code exchange)"),
    Meaning((48001, 50001, 50002), ("code", "refresh", "auth"), TRANSIENT,
            "api unauthorized or user limited, on a token call",
            "back off and retry later; never a re-authorization"),
    Meaning((40002, 40035, 40097, *range(41001, 41010)), ENDPOINTS, BUG,
            "invalid grant_type, invalid or missing parameter",
            "a keeper bug: error event wechat.keeper_bug, backoff, never a re-authorization"),
)

#: Any code not in the table.
UNKNOWN = Meaning((), ENDPOINTS, TRANSIENT, "unknown errcode",
                  "back off and retry later, logged with its code; never a re-authorization")

_INDEX: dict[tuple[str, int], Meaning] = {}
for _row in TABLE:
    for _code in _row.codes:
        for _endpoint in _row.endpoints:
            _INDEX.setdefault((_endpoint, _code), _row)


def meaning(endpoint: str, errcode: int) -> Meaning:
    """The table's row for ``errcode`` answered by ``endpoint`` (:data:`UNKNOWN` if none)."""
    return _INDEX.get((endpoint, errcode), UNKNOWN)
