"""Plain records passed between the store, the policy and the WeChat client.

No library imports: these are what the rest of keeper reasons about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keeper.core.clean import sex_code, text_or_none

# Grant states. A grant stays "active" or "expiring" while keeper can keep it alive; "reauth"
# means WeChat said it is dead and only a new login brings it back.
ACTIVE = "active"
EXPIRING = "expiring"  # refreshed on its refresh day, WeChat kept the same refresh token
REAUTH = "reauth"

# Re-authorization reasons (the contract's list); names, not secrets.
REFRESH_TOKEN_INVALID = "refresh_token_invalid"  # noqa: S105
REFRESH_TOKEN_EXPIRED = "refresh_token_expired"  # noqa: S105
AUTHORIZATION_REVOKED = "authorization_revoked"
REFRESH_TOKEN_EXPIRING = "refresh_token_expiring"  # noqa: S105
OTHER = "other"

#: Scopes whose grants may read ``/sns/userinfo``: a website's QR login (Open Platform) and an
#: Official Account page or mobile app that asked for the profile. ``snsapi_base`` alone not.
PROFILE_SCOPES = frozenset({"snsapi_userinfo", "snsapi_login"})


def scopes(scope: str) -> frozenset[str]:
    """WeChat's comma-separated ``scope`` as a set."""
    return frozenset(s.strip() for s in scope.split(",") if s.strip())


@dataclass(frozen=True)
class Grant:
    """One user's grant to one app, as stored. Times are aware UTC datetimes."""

    id: int
    appid: str
    openid: str
    unionid: str | None
    scope: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_expires_at: datetime
    refresh_issued_at: datetime
    state: str = ACTIVE
    failures: int = 0  # transient failures in a row
    retry_at: datetime | None = None  # not before this, after a transient failure
    last_error: str | None = None  # errcode or failure kind of the last failure, never a secret
    profile_at: datetime | None = None  # last profile read (answered, with or without a profile)
    profile_stop: int | None = None  # errcode that ended profile reads for good (48001)
    lease_id: str | None = None
    profile_failures: int = 0  # profile reads that failed in a row (tokens unaffected)
    profile_retry_at: datetime | None = None  # no profile read before this, after a failure
    profile_error: str | None = None  # what the last failed profile read was, never a secret
    #: Leased from a holder whose lease lapsed unreleased (set by each claim): that holder may
    #: be frozen with WeChat's newer tokens, which would make WeChat refuse these ones.
    taken_over: bool = False
    #: WeChat's definitive answer about these tokens, held unconfirmed because an earlier
    #: holder may yet write their successor (``keeper.core.policy.held_answer``): the errcode
    #: and when WeChat gave it. Only a record tells anyone the user must log in again.
    held_errcode: int | None = None
    held_since: datetime | None = None

    @property
    def wants_profile(self) -> bool:
        return bool(scopes(self.scope) & PROFILE_SCOPES) and self.profile_stop is None


@dataclass(frozen=True)
class TokenAnswer:
    """A successful answer of the code exchange or the refresh endpoint."""

    access_token: str = field(repr=False)
    expires_in_s: int
    refresh_token: str = field(repr=False)
    openid: str
    scope: str
    unionid: str | None = None
    is_snapshotuser: bool = False


@dataclass(frozen=True)
class Profile:
    """What ``/sns/userinfo`` said of a user, or why it said nothing (``errcode``)."""

    fetched_at: datetime
    nickname: str | None = None
    sex: int | None = None  # WeChat's code: 0 unknown, 1 male, 2 female (clean.sex_code)
    province: str | None = None
    city: str | None = None
    country: str | None = None
    headimgurl: str | None = None
    privilege: tuple[str, ...] = ()
    unionid: str | None = None
    errcode: int | None = None  # 48001, 50001, 50002: no profile

    @classmethod
    def from_answer(cls, data: dict[str, Any], fetched_at: datetime) -> Profile:
        """Tolerant of WeChat's quirks: missing fields, numbers as strings, text already
        cleaned by the client (:mod:`keeper.core.clean`) and capped here to stored lengths."""
        privilege = data.get("privilege") or []
        if not isinstance(privilege, list):
            privilege = [privilege]
        unionid = (text_or_none(data.get("unionid"), 129) or "").strip()
        return cls(
            fetched_at=fetched_at,
            nickname=text_or_none(data.get("nickname"), 256),
            sex=sex_code(data.get("sex")),
            province=text_or_none(data.get("province"), 128),
            city=text_or_none(data.get("city"), 128),
            country=text_or_none(data.get("country"), 128),
            headimgurl=text_or_none(data.get("headimgurl"), 1024),
            privilege=tuple(p for p in (text_or_none(v, 64) for v in privilege[:16]) if p),
            unionid=unionid if unionid and len(unionid) <= 128 else None,
        )


@dataclass(frozen=True)
class Reauth:
    """A user who must log in again, and why."""

    reason: str
    errcode: int | None
    since: datetime
