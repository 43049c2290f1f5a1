"""Documents about a user, the same from ``keeper profile --json`` and the API: never a token."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from keeper.core.models import Grant
from keeper.core.timestamps import timestamp, timestamp_or_none
from keeper.store.grants import Store

PROFILE_FIELDS = (
    "nickname", "sex", "province", "city", "country", "headimgurl", "privilege", "errcode",
    "fetched_at", "avatar_url", "avatar_sha256", "avatar_path", "avatar_size", "avatar_type",
    "avatar_saved_at", "avatar_error",
)


def profile_document(store: Store, grant: Grant) -> dict[str, Any]:
    """The grant (no tokens), its re-authorization record and its stored profile."""
    profile = store.profile(grant.id) or {}
    record = store.reauth_record(grant.id)
    data: dict[str, Any] = {
        "appid": grant.appid, "openid": grant.openid, "unionid": grant.unionid,
        "scope": grant.scope, "state": grant.state,
        "access_expires_at": timestamp(grant.access_expires_at),
        "refresh_issued_at": timestamp(grant.refresh_issued_at),
        "reauth": None if record is None else {
            "reason": record.reason, "errcode": record.errcode,
            "since": timestamp(record.since)},
        "profile_stop": grant.profile_stop,
    }
    for key in PROFILE_FIELDS:
        value = profile.get(key)
        data["profile_errcode" if key == "errcode" else key] = (
            timestamp(value) if isinstance(value, datetime) else value
        )
    return data


def reauth_row(row: dict[str, Any]) -> dict[str, Any]:
    """A re-authorization record as ``keeper reauth --json`` prints it."""
    return {"appid": row["appid"], "openid": row["openid"], "unionid": row["unionid"],
            "reason": row["reason"], "errcode": row["errcode"],
            "since": timestamp_or_none(row["since"])}
