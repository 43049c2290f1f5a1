"""Which events a batch of sweep results makes: read, inside the writing transaction, what
the batch is about to replace (profiles, re-authorization records), so an event says what
really changed and is committed, or rolled back, with the change."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select

from keeper.core.events import (
    PROFILE_CHANGED,
    PROFILE_FIELDS,
    NewEvent,
    profile_changes,
    reauth_cleared,
    reauth_recorded,
)
from keeper.store.rows import GrantWrite
from keeper.store.schema import profiles, reauth


def stored_profiles(conn: Any, writes: Sequence[GrantWrite]) -> dict[int, dict[str, Any]]:
    """The stored profiles of the writes that carry a new one (before they are replaced)."""
    ids = [w.grant.id for w in writes if w.profile is not None and w.profile.errcode is None]
    if not ids:
        return {}
    cols = [profiles.c.grant_id, *(profiles.c[k] for k in PROFILE_FIELDS)]
    out = {}
    for row in conn.execute(select(*cols).where(profiles.c.grant_id.in_(ids))):
        m = dict(row._mapping)
        m["privilege"] = json.loads(m["privilege"] or "[]")
        out[m.pop("grant_id")] = m
    return out


def stored_records(conn: Any, writes: Sequence[GrantWrite]) -> dict[int, tuple[str, int | None]]:
    """(reason, errcode) of the stored re-authorization records the writes record again."""
    ids = [w.grant.id for w in writes if w.reauth is not None]
    if not ids:
        return {}
    return {r.grant_id: (r.reason, r.errcode) for r in conn.execute(
        select(reauth.c.grant_id, reauth.c.reason, reauth.c.errcode)
        .where(reauth.c.grant_id.in_(ids)))}


def sweep_events(
    writes: Sequence[GrantWrite], *, old_profiles: Mapping[int, Mapping[str, Any]],
    old_records: Mapping[int, tuple[str, int | None]], cleared: Mapping[int, str],
) -> list[NewEvent]:
    """The events of a batch: a record that is new or says something new
    (``reauth.recorded``; the same reason and errcode again is no news), a record removed
    (``reauth.cleared``, with the reason it had), a profile whose fields changed."""
    news: list[NewEvent] = []
    for w in writes:
        g = w.grant
        if g.id in cleared and w.reauth is None:
            news.append(reauth_cleared(g.appid, g.openid, g.unionid, cleared[g.id]))
        if w.reauth is not None and old_records.get(g.id) != (w.reauth.reason,
                                                              w.reauth.errcode):
            news.append(reauth_recorded(g.appid, g.openid, g.unionid, w.reauth))
        if w.profile is not None:
            changes = profile_changes(old_profiles.get(g.id), w.profile)
            if changes:
                news.append(NewEvent(PROFILE_CHANGED, g.appid, g.openid, g.unionid,
                                     {"changed": changes}))
    return news
