"""Events: what keeper tells applications (docs/reference/events.md), as plain data.

An event is built once, when the change it reports is written, into the exact JSON text every
delivery attempt sends: ``{"id", "type", "created_at", "data": {"appid", "openid", "unionid",
...}}``. It never carries a token. The retry schedule of a delivery is here too (pure: ``now``
and the random draw are parameters).
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from keeper.core.models import Profile, Reauth
from keeper.core.timestamps import timestamp

REAUTH_RECORDED = "reauth.recorded"
REAUTH_CLEARED = "reauth.cleared"
PROFILE_CHANGED = "profile.changed"
AVATAR_CHANGED = "avatar.changed"
GRANT_DELETED = "grant.deleted"
#: Every event type, in the order docs/reference/events.md lists them.
TYPES = (REAUTH_RECORDED, REAUTH_CLEARED, PROFILE_CHANGED, AVATAR_CHANGED, GRANT_DELETED)

#: The profile fields whose change is a ``profile.changed`` (``privilege`` as a list).
PROFILE_FIELDS = ("nickname", "sex", "province", "city", "country", "headimgurl", "privilege",
                  "unionid")

_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base32, lower case


def new_event_id() -> str:
    """``evt_`` and 26 random base32 characters (130 bits): unique without coordination."""
    return "evt_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(26))


@dataclass(frozen=True)
class NewEvent:
    """An event about to be recorded: its type, whom it is about, and its own ``data``."""

    type: str
    appid: str
    openid: str
    unionid: str | None
    extra: Mapping[str, Any] = field(default_factory=dict)


def body(event_id: str, event: NewEvent, created_at: datetime) -> str:
    """The JSON text sent for ``event``: built once, so every attempt sends the same bytes."""
    data = {"appid": event.appid, "openid": event.openid, "unionid": event.unionid,
            **event.extra}
    return json.dumps({"id": event_id, "type": event.type,
                       "created_at": timestamp(created_at), "data": data},
                      ensure_ascii=False, separators=(",", ":"))


def reauth_recorded(appid: str, openid: str, unionid: str | None, record: Reauth) -> NewEvent:
    return NewEvent(REAUTH_RECORDED, appid, openid, unionid,
                    {"reason": record.reason, "errcode": record.errcode,
                     "since": timestamp(record.since)})


def reauth_cleared(appid: str, openid: str, unionid: str | None, reason: str) -> NewEvent:
    """A record that no longer holds: a new login or import, or WeChat renewed the token."""
    return NewEvent(REAUTH_CLEARED, appid, openid, unionid, {"reason": reason})


def profile_values(p: Profile) -> dict[str, Any]:
    """A profile's fields as compared (and as sent in ``changed``)."""
    return {"nickname": p.nickname, "sex": p.sex, "province": p.province, "city": p.city,
            "country": p.country, "headimgurl": p.headimgurl, "privilege": list(p.privilege),
            "unionid": p.unionid}


def profile_changes(old: Mapping[str, Any] | None, new: Profile) -> dict[str, Any]:
    """The fields of ``new`` that differ from the stored ``old`` (field → new value).

    Nothing when ``new`` carries no profile (48001/50001/50002 keep the stored one), and
    nothing for the first profile ever read (``old`` is None or never held a profile): the
    application saw that profile at the login; only later changes are news.
    """
    if new.errcode is not None or old is None:
        return {}
    if all(old.get(k) in (None, [], "") for k in PROFILE_FIELDS):
        return {}
    values = profile_values(new)
    return {k: v for k, v in values.items() if old.get(k) != v}


# -- the retry schedule --------------------------------------------------------------------

#: First retry after 30 to 60 s (equal jitter), doubling, capped at an hour between attempts.
RETRY_BASE_S = 60.0
RETRY_CAP_S = 3600.0
#: Attempts go on until this long after the first one; then the delivery is failed.
RETRY_FOR_S = 72 * 3600.0


def next_attempt(
    failures: int, first_try_at: datetime, now: datetime, *, draw: float | None = None,
) -> datetime | None:
    """When to try again after the ``failures``-th failed attempt (1 = the first), or None:
    the delivery has been tried for :data:`RETRY_FOR_S` and is failed now.

    ``min(RETRY_CAP_S, RETRY_BASE_S * 2^(failures-1))``, half fixed and half random (``draw``
    in [0, 1), default a fresh one), so receivers coming back are not hit by every event in
    the same second.
    """
    if (now - first_try_at).total_seconds() >= RETRY_FOR_S:
        return None
    pause = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(max(failures, 1) - 1, 32))
    draw = random.random() if draw is None else draw
    return now + timedelta(seconds=pause / 2 + pause / 2 * draw)
