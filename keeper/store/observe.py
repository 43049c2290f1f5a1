"""Read-side queries for metrics, the status page and the re-login forecast. Each is an
indexed or grouped query that stays cheap on a large table (docs/performance/metrics.md:
measured at 1,000,000 grants). A mixin of :class:`keeper.store.grants.Store`, which provides
``engine``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, Integer, cast, func, literal, select

from keeper.core.models import ACTIVE, EXPIRING
from keeper.store.db import translate
from keeper.store.schema import grants, reauth, sweeps

#: The kinds of work a grant falls due for, and the column saying when.
DUE_COLUMNS = {"refresh": grants.c.refresh_due_at, "access": grants.c.access_due_at,
               "profile": grants.c.profile_due_at}


class Observations:
    """Counts by app, work due, sweep history and the forecast."""

    engine: Engine

    def grant_counts(self) -> dict[tuple[str, str], int]:
        """Grants by (appid, state): an index-only scan of ``ix_grants_state``."""
        q = select(grants.c.appid, grants.c.state, func.count()).group_by(
            grants.c.appid, grants.c.state)
        with translate("counting grants"), self.engine.connect() as conn:
            return {(a, s): int(n) for a, s, n in conn.execute(q)}

    def reauth_counts(self) -> dict[tuple[str, str], int]:
        """Re-authorization records by (appid, reason): an index-only scan of
        ``ix_reauth_appid_reason`` (the record keeps its grant's appid)."""
        q = select(reauth.c.appid, reauth.c.reason, func.count()).group_by(
            reauth.c.appid, reauth.c.reason)
        with translate("counting re-authorizations"), self.engine.connect() as conn:
            return {(a, r): int(n) for a, r, n in conn.execute(q)}

    def due_counts(self, appids: Sequence[str], now: datetime,
                   overdue_before: datetime) -> dict[tuple[str, str], tuple[int, int]]:
        """Per (appid, kind): grants whose work is due at ``now``, and those of them due
        since before ``overdue_before``. One statement per app, each count a range of the
        (appid, due) indexes the sweep claims from (leased and backed-off grants are not due:
        their due times are pushed past the lease or the backoff)."""
        found: dict[tuple[str, str], tuple[int, int]] = {}
        with translate("counting work due"), self.engine.connect() as conn:
            for appid in appids:
                columns = []
                for column in DUE_COLUMNS.values():
                    for until in (now, overdue_before):
                        columns.append(select(func.count()).where(
                            grants.c.appid == appid, column <= until).scalar_subquery())
                row = conn.execute(select(*columns)).one()
                for i, kind in enumerate(DUE_COLUMNS):
                    found[(appid, kind)] = (int(row[2 * i]), int(row[2 * i + 1]))
        return found

    def last_sweep_finished_at(self) -> datetime | None:
        """When the latest finished sweep (of any process) ended."""
        with translate("reading the last sweep"), self.engine.connect() as conn:
            value: datetime | None = conn.execute(
                select(func.max(sweeps.c.finished_at))).scalar()
        return value

    def recent_sweeps(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest ``limit`` sweeps started (finished or not), newest first."""
        q = select(sweeps).order_by(sweeps.c.id.desc()).limit(limit)
        with translate("reading sweeps"), self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [{"id": r.id, "started_at": r.started_at, "finished_at": r.finished_at,
                 "host": r.host, "pid": r.pid, "summary": json.loads(r.summary or "{}")}
                for r in rows]

    def lapse_counts(self, appid: str, lifetime_s: float, start: datetime,
                     days: int) -> dict[int, tuple[int, int]]:
        """Live grants of ``appid`` whose refresh token's lifetime (``lifetime_s`` after
        ``refresh_issued_at``) ends in day ``d`` (0 to ``days`` - 1) of 86,400 s from
        ``start``: ``{d: (all live, expiring)}`` for the days that have any. "Expiring" are
        those WeChat already declined to renew (the same refresh token came back on the
        refresh day). A range scan of ``ix_grants_state`` per state."""
        origin = start - timedelta(seconds=lifetime_s)
        end = origin + timedelta(days=days)
        day = _day_number(self.engine.dialect.name, origin)
        q = (select(grants.c.state, day, func.count())
             .where(grants.c.appid == appid, grants.c.state.in_((ACTIVE, EXPIRING)),
                    grants.c.refresh_issued_at >= origin, grants.c.refresh_issued_at < end)
             .group_by(grants.c.state, day))
        found: dict[int, tuple[int, int]] = {}
        with translate("reading the forecast"), self.engine.connect() as conn:
            for state, d, n in conn.execute(q):
                live, expiring = found.get(int(d), (0, 0))
                found[int(d)] = (live + int(n), expiring + (int(n) if state == EXPIRING else 0))
        return found


def _day_number(dialect: str, origin: datetime) -> ColumnElement[Any]:
    """Whole days from ``origin`` to ``refresh_issued_at`` (never negative: the query keeps
    only grants issued at or after it)."""
    if dialect == "sqlite":
        # Stored as naive UTC text: whole seconds since the epoch (the fraction cut off first:
        # SQLite's clock keeps milliseconds and would round 23:59:59.9995 up to the next
        # day), then whole days.
        text = func.substr(grants.c.refresh_issued_at, 1, 19)
        seconds = cast(func.strftime("%s", text), Integer)
        return cast((seconds - literal(origin.timestamp())) / 86400, Integer)
    epoch = func.extract("epoch", grants.c.refresh_issued_at)
    return cast(func.floor((epoch - literal(origin.timestamp())) / 86400), Integer)
