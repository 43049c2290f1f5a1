"""Leases on grants: claiming what is due, writing results under the lease (or, when it
lapsed, only over the very tokens the work started from), holding a re-authorization that a
frozen earlier holder's newer tokens may disprove, and releasing what was not worked.

A mixin of :class:`keeper.store.grants.Store`, which provides ``engine``, ``cipher``,
``_tokens`` and ``_insert``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, case, delete, select, update

from keeper.core.models import REAUTH, Grant, Reauth
from keeper.crypto import Cipher, WrongKey
from keeper.store.changes import stored_profiles, stored_records, sweep_events
from keeper.store.clock import clock_params, db_later, db_now
from keeper.store.counters import take_seqs
from keeper.store.db import translate
from keeper.store.events import record_events
from keeper.store.rows import (
    DUE_COLUMNS,
    MUTABLE,
    PROFILE_FIELDS,
    GrantWrite,
    grant_of,
    profile_values,
    schedule_values,
)
from keeper.store.schema import UTCDateTime, grants, profiles, reauth


class Leases:
    """Claims, results and releases: the sweep's side of the store."""

    engine: Engine
    cipher: Cipher
    sqlite: bool

    def _insert(self, table: Any) -> Any:
        raise NotImplementedError

    def _tokens(self, g: Grant) -> dict[str, Any]:
        raise NotImplementedError

    def claim(
        self, *, appids: Iterable[str], cutoff: datetime, limit: int, lease_id: str,
        lease_s: float, now: datetime | None = None, exclude: Collection[int] = (),
        drained: set[tuple[str, str]] | None = None,
    ) -> list[Grant]:
        """Lease up to ``limit`` grants due at ``cutoff``, most urgent first.

        Urgency: refresh tokens nearest their refresh day, then access tokens nearest expiry,
        then profiles. Claims go app by app (quotas are per app) and each is a range scan of
        an (appid, due) index; leased grants (a few pages per process) are filtered out on
        the way. A lease only
        sets two columns, so claiming touches no index. ``cutoff`` (what is due) is this
        process's schedule; the lease lasts ``lease_s`` of the database's clock, which also
        decides which leases have lapsed (:mod:`keeper.store.clock`: on SQLite that clock is
        ``now``, default ``cutoff``). ``exclude``: grants this process holds a result for that
        is not written yet (their leases may have lapsed during a database outage).

        ``drained``: a sweep's record of the (due column, appid) scans that found fewer grants
        than they asked for, kept by the caller across its claims at one ``cutoff``: those
        scans are not made again, and a scan that comes up short is added. Without it, every
        claim of a sweep over ten apps whose grants are due only by their access tokens
        would first scan ten empty refresh-token ranges (a third more CPU per refresh than
        one app). What a scan missed because another process held it (a lease that lapses
        later in the sweep) is left to the next sweep, as what frees after the last claim is.
        """
        params = clock_params(self.sqlite, now or cutoff, lease_s, now_name="b_now",
                              later_name="b_until")
        apps = sorted(appids)
        claimed: list[Grant] = []
        with translate("claiming due grants"), self.engine.begin() as conn:
            for col in DUE_COLUMNS:
                for appid in apps:
                    need = limit - len(claimed)
                    if need <= 0:
                        return claimed
                    if drained is not None and (col.name, appid) in drained:
                        continue
                    found, short = self._claim_from(
                        conn, col, appid, cutoff=cutoff, limit=need, lease_id=lease_id,
                        params=params, exclude=exclude,
                    )
                    claimed.extend(found)
                    if short and drained is not None:
                        drained.add((col.name, appid))
        return claimed

    def _claim_from(
        self, conn: Any, col: Any, appid: str, *, cutoff: datetime, limit: int, lease_id: str,
        params: dict[str, Any], exclude: Collection[int] = (),
    ) -> tuple[list[Grant], bool]:
        """The grants leased from one scan, and whether the scan found fewer than ``limit``."""
        free = _free(db_now(self.sqlite, "b_now"))
        query = select(grants.c.id).where(grants.c.appid == appid, col <= cutoff, free)
        if exclude:
            query = query.where(grants.c.id.not_in(list(exclude)))
        ids = conn.execute(
            query
            .order_by(col)
            .limit(limit)
            .with_for_update(skip_locked=True),
            params,
        ).scalars().all()
        if not ids:
            return [], True
        # Checked again: on SQLite another process may have leased a row between the SELECT
        # and this UPDATE (PostgreSQL's SKIP LOCKED rules that out).
        rows = conn.execute(
            update(grants)
            .where(grants.c.id.in_(ids), col <= cutoff, free)
            .values(lease_id=lease_id, lease_until=db_later(self.sqlite, "b_until"),
                    taken_over=_TAKEN_OVER)
            .returning(*grants.c),
            params,
        ).all()
        order = {gid: i for i, gid in enumerate(ids)}
        return ([grant_of(r, self.cipher) for r in sorted(rows, key=lambda r: order[r.id])],
                len(ids) < limit)

    def claim_one(
        self, appid: str, openid: str, *, lease_id: str, lease_s: float, now: datetime,
        expiring_by: datetime | None = None,
    ) -> Grant | None:
        """Lease one grant for ``lease_s`` of the database's clock, for a one-user command;
        ``None`` if another process holds it, or it holds an answer for an earlier holder
        whose hold is not over (``now``: SQLite's clock, see :mod:`keeper.store.clock`).

        ``expiring_by``: lease it only if its access token expires by then. A caller that read
        a stale token may find it refreshed by another process since: then nothing is leased
        (and it reads the new token) instead of refreshing it a second time.
        """
        params = {"b_appid": appid, "b_openid": openid, "b_lease_id": lease_id,
                  **clock_params(self.sqlite, now, lease_s, now_name="b_now",
                                 later_name="b_lease_until")}
        query = _CLAIM_ONE[self.sqlite]
        if expiring_by is not None:
            query, params["b_expiring_by"] = _CLAIM_ONE_STALE[self.sqlite], expiring_by
        with self._alone("leasing a grant") as conn:
            row = conn.execute(query, params).first()
        return grant_of(row, self.cipher) if row else None

    def claim_stale(
        self, grant_ids: Collection[int], *, lease_id: str, lease_s: float, now: datetime,
        expiring_by: datetime,
    ) -> list[Grant]:
        """Lease those of ``grant_ids`` that are free and whose access token expires by
        ``expiring_by``, in one statement: the on-demand refreshes of ``keeper serve`` that
        came in together (:mod:`keeper.api.refresher`). What :meth:`claim_one` with
        ``expiring_by`` does for one grant; a grant another process holds, or refreshed since
        it was read, is left out."""
        if not grant_ids:
            return []
        params = {"b_ids": list(grant_ids), "b_lease_id": lease_id, "b_expiring_by": expiring_by,
                  **clock_params(self.sqlite, now, lease_s, now_name="b_now",
                                 later_name="b_lease_until")}
        with self._alone("leasing grants") as conn:
            rows = conn.execute(_CLAIM_STALE[self.sqlite], params).all()
        return [grant_of(r, self.cipher) for r in rows]

    @contextlib.contextmanager
    def _alone(self, what: str) -> Iterator[Any]:
        """A connection for one statement, atomic by itself: in autocommit on PostgreSQL (no
        BEGIN and COMMIT round trips: a third of an on-demand refresh's database time),
        committed after it on SQLite; rolled back if it fails."""
        with translate(what), self.engine.connect() as conn:
            if not self.sqlite:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn
            if self.sqlite:
                conn.commit()

    def apply(self, writes: Sequence[GrantWrite], lease_id: str, now: datetime,
              written: set[int] | None = None) -> int:
        """Write results of leased work in one transaction and end the leases.

        A grant still held under ``lease_id`` is written. One whose lease was lost (it lapsed
        during a database outage, or another process holds it now) is written only when its
        stored tokens are still the write's ``base``: then nothing newer has been stored, and
        this answer of WeChat's is the newest (a failure recorded meanwhile from the same
        tokens is replaced). Anything else is superseded and dropped.

        A re-authorization that an earlier holder's newer tokens would explain
        (``GrantWrite.doubtful``: 40030 or 42002 about the tokens the work started from) is
        *held*, not recorded, when such a holder may exist: the grant was taken over from a
        lapsed lease, or this write's own lease was lost. The tokens stay, nothing is recorded
        or announced, and claims skip the grant until ``hold_s`` has passed on the database's
        clock: the earlier holder's chance to write the tokens' successor, which clears the
        hold. Whoever claims the grant after that confirms the answer (record and event in
        one transaction, :func:`keeper.core.policy.confirm_held`). While an answer is held,
        only a result bringing a new refresh token, or a record needing no hold (42007, the
        hold's own confirmation), is written. Returns the number written (held answers
        included); ``written``, when given, receives their grant ids.
        """
        if not writes:
            return 0
        if all(_plain(w) for w in writes) and self._apply_own(writes, lease_id, now):
            if written is not None:
                written.update(w.grant.id for w in writes)
            return len(writes)
        with translate("saving results"), self.engine.begin() as conn:
            ids = [w.grant.id for w in writes]
            rows = {r.id: r for r in conn.execute(_HELD, {"b_ids": ids})}
            mine: list[GrantWrite] = []
            held: list[dict[str, Any]] = []
            for w in writes:
                row = rows.get(w.grant.id)
                if row is None:
                    continue  # the grant was deleted meanwhile
                own = row.lease_id == lease_id
                if not own and (w.base is None or not self._holds(row, w.base)):
                    continue  # superseded: newer tokens were stored meanwhile
                if row.held_until is not None and not w.renews and (
                        w.grant.state != REAUTH or w.hold_s is not None):
                    # Another answer is held for an earlier holder: only that holder's newer
                    # tokens, or a death no holder can undo (42007, the hold's confirmation),
                    # settle it, and this result is neither.
                    continue
                if (w.reauth is not None and w.hold_s is not None and row.state != REAUTH
                        and (w.grant.taken_over or not own)):
                    held.append(self._hold_params(w.grant.id, w.reauth, w.hold_s, now))
                elif own:
                    mine.append(w)
                else:
                    # Lease lost, tokens unchanged: this answer is the newest. A failure
                    # recorded meanwhile from the same tokens no longer holds.
                    keep_record = w.grant.state == REAUTH or w.reauth is not None
                    mine.append(w if keep_record else replace(w, clear_reauth=True))
            if held:
                conn.execute(_HOLD[self.sqlite], held)
            if written is not None:
                written.update(h["b_id"] for h in held)
                written.update(w.grant.id for w in mine)
            if not mine:
                return len(held)
            params = [
                {
                    "b_id": w.grant.id,
                    "b_now": now,
                    **self._tokens(w.grant),
                    **schedule_values(w.schedule),
                }
                for w in mine
            ]
            conn.execute(_WRITE, params)
            self._record(conn, mine, now)
        return len(mine) + len(held)

    def _apply_own(self, writes: Sequence[GrantWrite], lease_id: str, now: datetime) -> bool:
        """Plain results (new tokens or a failure counted, nothing recorded) under their own
        lease, with no answer held on the grants, written by one conditional UPDATE each (one
        executemany): what the transaction below does in that case, in one round trip
        instead of four (on-demand refreshes, ``keeper serve``). False when the condition
        does not hold for every one (a lease lost, a held answer, a grant deleted): then
        nothing was written (rolled back), and the transaction below decides each."""
        params = [{"b_id": w.grant.id, "b_lease_id": lease_id, "b_now": now,
                   **self._tokens(w.grant), **schedule_values(w.schedule)} for w in writes]
        if len(params) == 1:
            with self._alone("saving results") as conn:
                return bool(conn.execute(_WRITE_OWN, params[0]).rowcount)
        with translate("saving results"), self.engine.connect() as conn:
            # Both drivers count the rows of every execution of an executemany.
            if conn.execute(_WRITE_OWN, params).rowcount != len(params):
                conn.rollback()
                return False
            conn.commit()
        return True

    def _hold_params(self, grant_id: int, record: Reauth, hold_s: float,
                     now: datetime) -> dict[str, Any]:
        return {
            "b_id": grant_id, "b_errcode": record.errcode, "b_since": record.since,
            # Due (by this process's clock) when the hold ends, so that the first sweep
            # after it confirms the answer; no access or profile work meanwhile.
            "b_due": now + timedelta(seconds=hold_s), "b_now": now,
            **clock_params(self.sqlite, now, hold_s, now_name="b_now", later_name="b_until"),
        }

    def _holds(self, row: Any, base: tuple[str, str]) -> bool:
        """Whether a stored row's tokens are ``base`` (access, refresh)."""
        try:
            stored = (self.cipher.decrypt(row.access_token),
                      self.cipher.decrypt(row.refresh_token))
        except WrongKey:  # a token these keys cannot read is not the one the work began with
            return False
        return stored == base

    def _record(self, conn: Any, writes: Sequence[GrantWrite], now: datetime) -> None:
        # What is about to be replaced, read first in this transaction: the events say what
        # changed, and commit (or roll back) with the change.
        old_profiles = stored_profiles(conn, writes)
        old_records = stored_records(conn, writes)
        profile_rows = [
            {"grant_id": w.grant.id, **profile_values(w.profile)} for w in writes if w.profile
        ]
        if profile_rows:
            stmt = self._insert(profiles)
            # A "no profile" answer (errcode) keeps the last profile that was read.
            set_ = {
                k: case((stmt.excluded.errcode.is_(None), stmt.excluded[k]), else_=profiles.c[k])
                for k in PROFILE_FIELDS
            }
            set_["errcode"] = stmt.excluded.errcode
            set_["fetched_at"] = stmt.excluded.fetched_at
            conn.execute(stmt.on_conflict_do_update(index_elements=["grant_id"], set_=set_),
                         profile_rows)
        cleared = [w.grant.id for w in writes if w.clear_reauth]
        gone: dict[int, str] = {}
        if cleared:
            gone = dict(conn.execute(delete(reauth).where(reauth.c.grant_id.in_(cleared))
                                     .returning(reauth.c.grant_id, reauth.c.reason)).all())
        records = [
            {"grant_id": w.grant.id, "reason": w.reauth.reason, "errcode": w.reauth.errcode,
             "since": w.reauth.since, "appid": w.grant.appid}
            for w in writes if w.reauth
        ]
        if records:
            for row, seq in zip(records, take_seqs(conn, "reauth", len(records)), strict=True):
                row["seq"] = seq
            stmt = self._insert(reauth)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["grant_id"],
                    set_={"reason": stmt.excluded.reason, "errcode": stmt.excluded.errcode,
                          "since": stmt.excluded.since, "seq": stmt.excluded.seq},
                ),
                records,
            )
        # Last: the events counter is taken after the reauth one (one order, no deadlock).
        record_events(conn, sweep_events(writes, old_profiles=old_profiles,
                                         old_records=old_records, cleared=gone), now)

    def release(self, grant_ids: Sequence[int], lease_id: str) -> int:
        """End leases on grants that were not worked; they stay due as they were."""
        if not grant_ids:
            return 0
        with translate("releasing leases"), self.engine.begin() as conn:
            result = conn.execute(
                update(grants)
                .where(grants.c.id.in_(grant_ids), grants.c.lease_id == lease_id)
                .values(lease_id=None, lease_until=None)
            )
        return int(result.rowcount or 0)


def _plain(w: GrantWrite) -> bool:
    """A result that records, clears, holds and announces nothing: only the grant's row
    changes (no profile, no re-authorization record, so no event either)."""
    return (w.profile is None and w.reauth is None and not w.clear_reauth
            and w.hold_s is None)


def _free(now: Any) -> Any:
    """Not leased, or leased by a process whose lease has lapsed (it crashed) by ``now``, the
    database's clock; and holding no answer for an earlier holder, or that hold is over."""
    return ((grants.c.lease_id.is_(None) | (grants.c.lease_until <= now))
            & (grants.c.held_until.is_(None) | (grants.c.held_until <= now)))


#: What a claim sets ``taken_over`` to: whether the lease it replaces was still there (a
#: released or written lease is NULL), read from the row as it was before the claim.
_TAKEN_OVER = grants.c.lease_id.is_not(None)


# Statements built once. ``keeper serve`` runs them for every token it refreshes (one grant
# at a time), and building one with its cache key cost more CPU than running it: half of
# claim_one's 2.6 ms, a quarter of apply's 3.3 ms (``python -m bench api``).
# Keyed by "is SQLite": the database's clock is a parameter there, clock_timestamp() on
# PostgreSQL.
_CLAIM_ONE = {
    sqlite: update(grants)
    .where(grants.c.appid == bindparam("b_appid"), grants.c.openid == bindparam("b_openid"),
           _free(db_now(sqlite, "b_now")))
    .values(lease_id=bindparam("b_lease_id"), lease_until=db_later(sqlite, "b_lease_until"),
            taken_over=_TAKEN_OVER)
    .returning(*grants.c)
    for sqlite in (True, False)
}
#: claim_one for an on-demand refresh: only while the access token is still stale.
_CLAIM_ONE_STALE = {
    sqlite: stmt.where(
        grants.c.access_expires_at
        <= bindparam("b_expiring_by", type_=grants.c.access_expires_at.type)
    )
    for sqlite, stmt in _CLAIM_ONE.items()
}
#: claim_stale: those of the grants named that are free and still stale.
_CLAIM_STALE = {
    sqlite: update(grants)
    .where(grants.c.id.in_(bindparam("b_ids", expanding=True)),
           _free(db_now(sqlite, "b_now")),
           grants.c.access_expires_at
           <= bindparam("b_expiring_by", type_=grants.c.access_expires_at.type))
    .values(lease_id=bindparam("b_lease_id"), lease_until=db_later(sqlite, "b_lease_until"),
            taken_over=_TAKEN_OVER)
    .returning(*grants.c)
    for sqlite in (True, False)
}
#: apply's first step: the rows its results are for, locked, with what decides whether each
#: result is still wanted.
_HELD = (
    select(grants.c.id, grants.c.lease_id, grants.c.access_token, grants.c.refresh_token,
           grants.c.state, grants.c.held_until)
    .where(grants.c.id.in_(bindparam("b_ids", expanding=True)))
    .with_for_update()
)
#: apply's write of one result (executemany), ending the lease.
_WRITE = (
    update(grants)
    .where(grants.c.id == bindparam("b_id"))
    .values(
        {k: bindparam(k) for k in (*MUTABLE, "key_id", *(c.name for c in DUE_COLUMNS))}
        | {"lease_id": None, "lease_until": None,
           "updated_at": bindparam("b_now", type_=grants.c.updated_at.type),
           # A result written settles any held answer: it is that answer confirmed, or it
           # brings the tokens' successor (apply drops anything else while one is held).
           "held_errcode": None, "held_since": None, "held_until": None}
    )
)
#: apply's write of a plain result while the lease is still this process's and no answer is
#: held (:meth:`Leases._apply_own`).
_WRITE_OWN = _WRITE.where(grants.c.lease_id == bindparam("b_lease_id"),
                          grants.c.held_until.is_(None))
#: apply's hold of a doubtful answer (executemany): the tokens stay, the lease ends, and
#: claims skip the grant until ``held_until`` on the database's clock.
_HOLD = {
    sqlite: update(grants)
    .where(grants.c.id == bindparam("b_id"))
    .values(held_errcode=bindparam("b_errcode", type_=grants.c.held_errcode.type),
            held_since=bindparam("b_since", type_=UTCDateTime()),
            held_until=db_later(sqlite, "b_until"),
            refresh_due_at=bindparam("b_due", type_=UTCDateTime()),
            access_due_at=None, profile_due_at=None, lease_id=None, lease_until=None,
            updated_at=bindparam("b_now", type_=UTCDateTime()))
    for sqlite in (True, False)
}
