"""Read-side queries of the store: reports for ``keeper status``, ``reauth``, ``profile``, and
the sweep history. A mixin of :class:`keeper.store.grants.Store`, which provides ``engine``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from keeper.core.models import REAUTH, Reauth
from keeper.core.policy import PROFILE_FAILING_AFTER
from keeper.core.timestamps import timestamp
from keeper.store.db import translate
from keeper.store.schema import grants, profiles, reauth, sweeps


class Reports:
    """What operators ask of the store."""

    engine: Engine

    def iter_reauth(self, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every user who must re-authorize, in grant order, read in batches."""
        last_id = 0
        while True:
            q = (
                select(grants.c.appid, grants.c.openid, grants.c.unionid, reauth.c.reason,
                       reauth.c.errcode, reauth.c.since, reauth.c.grant_id)
                .join(grants, grants.c.id == reauth.c.grant_id)
                .order_by(reauth.c.grant_id)
                .where(reauth.c.grant_id > last_id)
                .limit(batch)
            )
            with translate("listing re-authorizations"), self.engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(q)]
            yield from rows
            if len(rows) < batch:
                return
            last_id = rows[-1]["grant_id"]

    def profile(self, grant_id: int) -> dict[str, Any] | None:
        with translate("reading a profile"), self.engine.connect() as conn:
            row = conn.execute(select(profiles).where(profiles.c.grant_id == grant_id)).first()
        if row is None:
            return None
        data = dict(row._mapping)
        data["privilege"] = json.loads(data["privilege"] or "[]")
        return data

    def reauth_record(self, grant_id: int) -> Reauth | None:
        with translate("reading a re-authorization"), self.engine.connect() as conn:
            row = conn.execute(select(reauth).where(reauth.c.grant_id == grant_id)).first()
        return Reauth(row.reason, row.errcode, row.since) if row else None

    def status(self, now: datetime) -> dict[str, Any]:
        """Counts for ``keeper status`` (each an indexed or single-pass query)."""
        live = grants.c.state != REAUTH
        with translate("reading status"), self.engine.connect() as conn:
            counts = conn.execute(
                select(
                    func.count(),
                    func.count().filter(live),
                    func.count().filter(live, grants.c.access_expires_at <= now),
                    func.count().filter(
                        live, grants.c.refresh_due_at <= now + timedelta(hours=24)
                    ),
                    func.count().filter(live, grants.c.failures > 0),
                    func.count().filter(
                        live, grants.c.profile_failures >= PROFILE_FAILING_AFTER),
                    # Answers held for an earlier holder: not records (nobody was told).
                    func.count().filter(grants.c.held_until.is_not(None)),
                )
            ).one()
            by_reason: dict[str, int] = {
                reason: n for reason, n in
                conn.execute(select(reauth.c.reason, func.count()).group_by(reauth.c.reason))
            }
            has_avatar = (profiles.c.headimgurl.is_not(None)) & (profiles.c.headimgurl != "")
            avatars = conn.execute(select(
                func.count().filter(profiles.c.avatar_sha256.is_not(None)),
                func.count().filter(profiles.c.avatar_error.is_not(None)),
                # A user with an avatar whose current picture keeper has no copy of.
                func.count().filter(has_avatar, profiles.c.errcode.is_(None),
                                    profiles.c.avatar_sha256.is_(None)
                                    | (profiles.c.avatar_url != profiles.c.headimgurl)
                                    | profiles.c.avatar_url.is_(None)),
            )).one()
        return {
            "grants": counts[0],
            "active": counts[1],
            "reauth_required": sum(by_reason.values()),
            "reauth_by_reason": by_reason,
            "reauth_held": counts[6],
            "refresh_due_24h": counts[3],
            "access_expired": counts[2],
            "retrying": counts[4],
            "profiles_failing": counts[5],
            "avatars_saved": avatars[0],
            "avatars_refused": avatars[1],
            "avatars_missing": avatars[2],
        }

    # -- sweeps ----------------------------------------------------------------------------

    def start_sweep(self, now: datetime, *, host: str, pid: int) -> int:
        with translate("recording a sweep"), self.engine.begin() as conn:
            return int(conn.execute(
                insert(sweeps).values(started_at=now, host=host, pid=pid).returning(sweeps.c.id)
            ).scalar_one())

    def finish_sweep(self, sweep_id: int, now: datetime, summary: Mapping[str, Any]) -> None:
        with translate("recording a sweep"), self.engine.begin() as conn:
            conn.execute(
                update(sweeps).where(sweeps.c.id == sweep_id)
                .values(finished_at=now, summary=json.dumps(dict(summary)))
            )

    def last_sweep(self) -> dict[str, Any] | None:
        with translate("reading the last sweep"), self.engine.connect() as conn:
            row = conn.execute(
                select(sweeps).where(sweeps.c.finished_at.is_not(None))
                .order_by(sweeps.c.finished_at.desc()).limit(1)
            ).first()
        if row is None:
            return None
        return {
            "started_at": timestamp(row.started_at),
            "finished_at": timestamp(row.finished_at),
            "host": row.host,
            "pid": row.pid,
            "summary": json.loads(row.summary or "{}"),
        }
