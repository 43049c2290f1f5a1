"""Rows of the grant store: a grant as read (tokens decrypted), the values written for a
schedule and a profile, and ``GrantWrite``, the new state of a leased grant."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from keeper.core.models import Grant, Profile, Reauth
from keeper.core.policy import Schedule
from keeper.crypto import Cipher
from keeper.store.schema import grants

DUE_COLUMNS = (grants.c.refresh_due_at, grants.c.access_due_at, grants.c.profile_due_at)
#: The columns of ``grants`` a write may change (the key columns and the lease never are).
MUTABLE = (
    "unionid", "scope", "access_token", "refresh_token", "access_expires_at",
    "refresh_issued_at", "state", "failures", "retry_at", "last_error", "profile_at",
    "profile_stop", "profile_failures", "profile_retry_at", "profile_error",
)

#: The columns of ``profiles`` a profile read writes.
PROFILE_FIELDS = (
    "nickname", "sex", "province", "city", "country", "headimgurl", "privilege", "unionid",
    "avatar_due",
)


@dataclass(frozen=True)
class GrantWrite:
    """The new state of a leased grant, and what to record beside it.

    ``base``: the (access token, refresh token) the work started from. A write whose lease
    lapsed is still applied when the stored tokens are exactly these (nothing newer was
    written meanwhile), so a result WeChat answered is never thrown away for a lapsed lease
    and never overwrites a newer token.

    ``hold_s``: set when ``reauth`` is an answer about ``base`` that an earlier holder's
    newer tokens would explain (:func:`keeper.core.policy.held_answer`). If an earlier holder
    may still write (the grant was taken over from a lapsed lease, or this write's own lease
    was lost), the answer is held that long on the database's clock instead of recorded
    (:meth:`keeper.store.leases.Leases.apply`).
    """

    grant: Grant
    schedule: Schedule
    profile: Profile | None = None
    reauth: Reauth | None = None
    clear_reauth: bool = False
    base: tuple[str, str] | None = field(default=None, repr=False)
    hold_s: float | None = None

    @property
    def doubtful(self) -> bool:
        """A re-authorization an earlier holder's newer tokens may yet disprove."""
        return self.reauth is not None and self.hold_s is not None

    @property
    def renews(self) -> bool:
        """Whether this write carries a refresh token other than the one the work started
        from: the only answer that disproves a held 40030 or 42002."""
        return self.base is not None and self.grant.refresh_token != self.base[1]


def new_lease_id() -> str:
    return secrets.token_hex(8)


def grant_of(row: Row[Any] | Mapping[str, Any], cipher: Cipher) -> Grant:
    """The :class:`Grant` of a ``grants`` row, its tokens decrypted."""
    m = row._mapping if isinstance(row, Row) else row
    return Grant(
        id=m["id"], appid=m["appid"], openid=m["openid"], unionid=m["unionid"],
        scope=m["scope"], access_token=cipher.decrypt(m["access_token"]),
        # Remembered: a refresh mostly brings the same refresh token back, and writing it
        # then reuses what is stored rather than sealing it again.
        refresh_token=cipher.decrypt(m["refresh_token"], remember=True),
        access_expires_at=m["access_expires_at"], refresh_issued_at=m["refresh_issued_at"],
        state=m["state"], failures=m["failures"], retry_at=m["retry_at"],
        last_error=m["last_error"], profile_at=m["profile_at"], profile_stop=m["profile_stop"],
        lease_id=m["lease_id"], profile_failures=m["profile_failures"],
        profile_retry_at=m["profile_retry_at"], profile_error=m["profile_error"],
        taken_over=bool(m["taken_over"]), held_errcode=m["held_errcode"],
        held_since=m["held_since"],
    )


def schedule_values(s: Schedule) -> dict[str, datetime | None]:
    """The due columns of a schedule."""
    return {
        "refresh_due_at": s.refresh_due_at,
        "access_due_at": s.access_due_at,
        "profile_due_at": s.profile_due_at,
    }


def profile_values(p: Profile) -> dict[str, Any]:
    """The ``profiles`` columns of a profile read."""
    return {
        "nickname": p.nickname, "sex": p.sex, "province": p.province, "city": p.city,
        "country": p.country, "headimgurl": p.headimgurl,
        "privilege": json.dumps(list(p.privilege), ensure_ascii=False),
        "unionid": p.unionid, "errcode": p.errcode, "fetched_at": p.fetched_at,
        "avatar_due": p.errcode is None,
    }

