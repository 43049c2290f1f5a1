"""The grant store (SQLAlchemy Core): what is due, leases, results, reports, quota state.

One class, one engine. Every public method is a short transaction; none holds a lock across a
WeChat call. Many processes share one database: work is claimed with a lease (a conditional
``UPDATE``; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and quotas are one compare-and-swap row.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Row, bindparam, case, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from keeper.avatar_state import AvatarState
from keeper.crypto import Cipher, WrongKey
from keeper.db import ensure_schema, is_sqlite, make_engine, translate
from keeper.models import REAUTH, Grant, Profile, Reauth
from keeper.policy import Schedule
from keeper.quota_state import QuotaState
from keeper.reports import Reports
from keeper.schema import grants, meta, profiles, reauth

DUE_COLUMNS = (grants.c.refresh_due_at, grants.c.access_due_at, grants.c.profile_due_at)
_MUTABLE = (
    "unionid", "scope", "access_token", "refresh_token", "access_expires_at",
    "refresh_issued_at", "state", "failures", "retry_at", "last_error", "profile_at",
    "profile_stop", "profile_failures", "profile_retry_at", "profile_error",
)

_PROFILE_FIELDS = (
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
    """

    grant: Grant
    schedule: Schedule
    profile: Profile | None = None
    reauth: Reauth | None = None
    clear_reauth: bool = False
    base: tuple[str, str] | None = field(default=None, repr=False)


def new_lease_id() -> str:
    return secrets.token_hex(8)


def _grant(row: Row[Any] | Mapping[str, Any], cipher: Cipher) -> Grant:
    m = row._mapping if isinstance(row, Row) else row
    return Grant(
        id=m["id"], appid=m["appid"], openid=m["openid"], unionid=m["unionid"],
        scope=m["scope"], access_token=cipher.decrypt(m["access_token"]),
        refresh_token=cipher.decrypt(m["refresh_token"]),
        access_expires_at=m["access_expires_at"], refresh_issued_at=m["refresh_issued_at"],
        state=m["state"], failures=m["failures"], retry_at=m["retry_at"],
        last_error=m["last_error"], profile_at=m["profile_at"], profile_stop=m["profile_stop"],
        lease_id=m["lease_id"], profile_failures=m["profile_failures"],
        profile_retry_at=m["profile_retry_at"], profile_error=m["profile_error"],
    )


def _schedule_values(s: Schedule) -> dict[str, datetime | None]:
    return {
        "refresh_due_at": s.refresh_due_at,
        "access_due_at": s.access_due_at,
        "profile_due_at": s.profile_due_at,
    }


def _profile_values(p: Profile) -> dict[str, Any]:
    return {
        "nickname": p.nickname, "sex": p.sex, "province": p.province, "city": p.city,
        "country": p.country, "headimgurl": p.headimgurl,
        "privilege": json.dumps(list(p.privilege), ensure_ascii=False),
        "unionid": p.unionid, "errcode": p.errcode, "fetched_at": p.fetched_at,
        "avatar_due": p.errcode is None,
    }


class Store(Reports, QuotaState, AvatarState):
    """The database behind keeper. ``auto_upgrade``: migrate on open (embedded SQLite)."""

    def __init__(
        self, url: str, *, cipher: Cipher, pool_size: int = 8, auto_upgrade: bool | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self.cipher = cipher
        self.engine: Engine = make_engine(url, pool_size=pool_size, timeout_s=timeout_s)
        self.sqlite = is_sqlite(url)
        self.auto_upgrade = self.sqlite if auto_upgrade is None else auto_upgrade

    def open(self) -> Store:
        """Check (or on SQLite, bring up to date) the schema and the encryption keys.

        Raises StoreError, or :class:`keeper.crypto.WrongKey` when the configured keys cannot
        read this database (nothing is written then).
        """
        ensure_schema(self.engine, auto_upgrade=self.auto_upgrade, cipher=self.cipher)
        self._check_keys()
        return self

    def _check_keys(self) -> None:
        with translate("checking the encryption key"), self.engine.begin() as conn:
            check = conn.execute(select(meta.c.value).where(meta.c.name == "key_check")).scalar()
            if check is None:
                conn.execute(self._insert(meta).values(name="key_check",
                             value=self.cipher.check_value()).on_conflict_do_nothing())
            unknown = conn.execute(
                select(grants.c.key_id).distinct().where(grants.c.key_id.not_in(self.cipher.ids))
            ).scalars().all()
        if check is not None:
            self.cipher.verify(check)
        if unknown:
            raise WrongKey(
                f"tokens in this database are encrypted with key(s) {', '.join(map(str, unknown))}"
                f", which encryption_key_file does not hold (configured: "
                f"{', '.join(self.cipher.ids)}); keeper will not start without them"
            )

    def rotate_keys(self, *, batch: int = 500) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` grants not yet under the primary key; (done, left).

        Each row is rewritten only if it still holds what was read (compare-and-swap), so a
        sweep writing the same grant meanwhile wins, and its write is under the primary key
        already. Safe to run beside the service, and to interrupt and run again.
        """
        stale = grants.c.key_id.is_distinct_from(self.cipher.primary_id)
        with translate("rotating keys"), self.engine.begin() as conn:
            rows = conn.execute(
                select(grants.c.id, grants.c.access_token, grants.c.refresh_token)
                .where(stale).order_by(grants.c.id).limit(batch)
            ).all()
            params = [
                {"b_id": r.id, "b_access": r.access_token, "b_refresh": r.refresh_token,
                 "access_token": self.cipher.encrypt(self.cipher.decrypt(r.access_token)),
                 "refresh_token": self.cipher.encrypt(self.cipher.decrypt(r.refresh_token)),
                 "key_id": self.cipher.primary_id}
                for r in rows
            ]
            if params:
                conn.execute(
                    update(grants).where(
                        grants.c.id == bindparam("b_id"),
                        grants.c.access_token == bindparam("b_access"),
                        grants.c.refresh_token == bindparam("b_refresh"),
                    ).values(access_token=bindparam("access_token"),
                             refresh_token=bindparam("refresh_token"),
                             key_id=bindparam("key_id")),
                    params,
                )
            left = conn.execute(select(func.count()).where(stale)).scalar_one()
            if not left:
                # Last: the key check, so an old key is only dropped after every token moved.
                conn.execute(update(meta).where(meta.c.name == "key_check")
                             .values(value=self.cipher.check_value()))
        return len(params), int(left)

    def _tokens(self, g: Grant) -> dict[str, Any]:
        """The grant's mutable columns as stored: tokens encrypted with the primary key."""
        values = {k: getattr(g, k) for k in _MUTABLE}
        values["access_token"] = self.cipher.encrypt(g.access_token)
        values["refresh_token"] = self.cipher.encrypt(g.refresh_token)
        values["key_id"] = self.cipher.primary_id
        return values

    def close(self) -> None:
        self.engine.dispose()

    def _insert(self, table: Any) -> Any:
        return (sqlite.insert if self.sqlite else postgresql.insert)(table)

    # -- grants in -------------------------------------------------------------------------

    def upsert_grants(self, writes: Sequence[GrantWrite], now: datetime) -> int:
        """Insert or replace grants by (appid, openid) — a login or an import.

        A new grant for a user clears their re-authorization record and any lease (a sweep
        working the old tokens then loses its write, so the new tokens win). The profile
        schedule of an existing grant is kept: re-importing does not re-read every profile.
        """
        if not writes:
            return 0
        rows = []
        for w in writes:
            g = w.grant
            rows.append({
                "appid": g.appid, "openid": g.openid,
                **self._tokens(g),
                **_schedule_values(w.schedule),
                "lease_id": None, "lease_until": None, "created_at": now, "updated_at": now,
            })
        stmt = self._insert(grants)
        ex = stmt.excluded
        keep = {"profile_at", "profile_stop", "profile_failures", "profile_retry_at",
                "profile_error"}
        stmt = stmt.on_conflict_do_update(
            index_elements=["appid", "openid"],
            set_={
                **{k: ex[k] for k in (*_MUTABLE, "key_id") if k not in keep},
                "profile_stop": func.coalesce(ex.profile_stop, grants.c.profile_stop),
                "refresh_due_at": ex.refresh_due_at,
                "access_due_at": ex.access_due_at,
                "profile_due_at": func.coalesce(grants.c.profile_due_at, ex.profile_due_at),
                "lease_id": None, "lease_until": None, "updated_at": now,
            },
        )
        with translate("storing grants"), self.engine.begin() as conn:
            conn.execute(stmt, rows)
            by_app: dict[str, list[str]] = {}
            for w in writes:
                by_app.setdefault(w.grant.appid, []).append(w.grant.openid)
            for appid, openids in by_app.items():
                ids = select(grants.c.id).where(
                    grants.c.appid == appid, grants.c.openid.in_(openids)
                )
                conn.execute(delete(reauth).where(reauth.c.grant_id.in_(ids)))
        return len(rows)

    # -- grants out ------------------------------------------------------------------------

    def analyze(self) -> None:
        """Refresh the planner's statistics (after a large import)."""
        with translate("analyzing"), self.engine.begin() as conn:
            conn.execute(text("ANALYZE grants"))

    def get_grant(self, appid: str, openid: str) -> Grant | None:
        with translate("reading a grant"), self.engine.connect() as conn:
            row = conn.execute(
                select(grants).where(grants.c.appid == appid, grants.c.openid == openid)
            ).first()
        return _grant(row, self.cipher) if row else None

    @staticmethod
    def _free(now: datetime) -> Any:
        """Not leased, or leased by a process whose lease has lapsed (it crashed)."""
        return grants.c.lease_id.is_(None) | (grants.c.lease_until <= now)

    def claim(
        self, *, appids: Iterable[str], cutoff: datetime, limit: int, lease_id: str,
        lease_until: datetime, now: datetime | None = None, exclude: Collection[int] = (),
    ) -> list[Grant]:
        """Lease up to ``limit`` grants due at ``cutoff``, most urgent first.

        Urgency: refresh tokens nearest their refresh day, then access tokens nearest expiry,
        then profiles. Claims go app by app (quotas are per app) and each is a range scan of
        an (appid, due) index; leased grants (a few pages per process) are filtered out on
        the way. A lease only
        sets two columns, so claiming touches no index. ``now`` (default ``cutoff``) decides
        which leases have lapsed. ``exclude``: grants this process holds a result for that is
        not written yet (their leases may have lapsed during a database outage).
        """
        now = now or cutoff
        apps = sorted(appids)
        claimed: list[Grant] = []
        with translate("claiming due grants"), self.engine.begin() as conn:
            for col in DUE_COLUMNS:
                for appid in apps:
                    need = limit - len(claimed)
                    if need <= 0:
                        return claimed
                    claimed.extend(self._claim_from(
                        conn, col, appid, cutoff=cutoff, limit=need, lease_id=lease_id,
                        lease_until=lease_until, now=now, exclude=exclude,
                    ))
        return claimed

    def _claim_from(
        self, conn: Any, col: Any, appid: str, *, cutoff: datetime, limit: int, lease_id: str,
        lease_until: datetime, now: datetime, exclude: Collection[int] = (),
    ) -> list[Grant]:
        query = select(grants.c.id).where(grants.c.appid == appid, col <= cutoff,
                                          self._free(now))
        if exclude:
            query = query.where(grants.c.id.not_in(list(exclude)))
        ids = conn.execute(
            query
            .order_by(col)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars().all()
        if not ids:
            return []
        # Checked again: on SQLite another process may have leased a row between the SELECT
        # and this UPDATE (PostgreSQL's SKIP LOCKED rules that out).
        rows = conn.execute(
            update(grants)
            .where(grants.c.id.in_(ids), col <= cutoff, self._free(now))
            .values(lease_id=lease_id, lease_until=lease_until)
            .returning(*grants.c)
        ).all()
        order = {gid: i for i, gid in enumerate(ids)}
        return [_grant(r, self.cipher) for r in sorted(rows, key=lambda r: order[r.id])]

    def claim_one(
        self, appid: str, openid: str, *, lease_id: str, lease_until: datetime, now: datetime
    ) -> Grant | None:
        """Lease one grant for a one-user command; ``None`` if another process holds it."""
        with translate("leasing a grant"), self.engine.begin() as conn:
            row = conn.execute(
                update(grants)
                .where(grants.c.appid == appid, grants.c.openid == openid, self._free(now))
                .values(lease_id=lease_id, lease_until=lease_until)
                .returning(*grants.c)
            ).first()
        return _grant(row, self.cipher) if row else None

    def apply(self, writes: Sequence[GrantWrite], lease_id: str, now: datetime) -> int:
        """Write results of leased work in one transaction and end the leases.

        A grant still held under ``lease_id`` is written. One whose lease was lost (it lapsed
        during a database outage, or another process holds it now) is written only when its
        stored tokens are still the write's ``base``: then nothing newer has been stored, and
        this answer of WeChat's is the newest (a failure recorded meanwhile from the same
        tokens is replaced). Anything else is superseded and dropped. Returns the number
        written.
        """
        if not writes:
            return 0
        with translate("saving results"), self.engine.begin() as conn:
            ids = [w.grant.id for w in writes]
            rows = {r.id: r for r in conn.execute(
                select(grants.c.id, grants.c.lease_id, grants.c.access_token,
                       grants.c.refresh_token)
                .where(grants.c.id.in_(ids))
                .with_for_update()
            )}
            mine: list[GrantWrite] = []
            for w in writes:
                row = rows.get(w.grant.id)
                if row is None:
                    continue  # the grant was deleted meanwhile
                if row.lease_id == lease_id:
                    mine.append(w)
                elif w.base is not None and self._holds(row, w.base):
                    # Lease lost, tokens unchanged: this answer is the newest. A failure
                    # recorded meanwhile from the same tokens no longer holds.
                    keep_record = w.grant.state == REAUTH or w.reauth is not None
                    mine.append(w if keep_record else replace(w, clear_reauth=True))
            if not mine:
                return 0
            params = [
                {
                    "b_id": w.grant.id,
                    **self._tokens(w.grant),
                    **_schedule_values(w.schedule),
                }
                for w in mine
            ]
            conn.execute(
                update(grants)
                .where(grants.c.id == bindparam("b_id"))
                .values(
                    {k: bindparam(k)
                     for k in (*_MUTABLE, "key_id", *(c.name for c in DUE_COLUMNS))}
                    | {"lease_id": None, "lease_until": None, "updated_at": now}
                ),
                params,
            )
            self._record(conn, mine)
        return len(mine)

    def _holds(self, row: Any, base: tuple[str, str]) -> bool:
        """Whether a stored row's tokens are ``base`` (access, refresh)."""
        try:
            stored = (self.cipher.decrypt(row.access_token),
                      self.cipher.decrypt(row.refresh_token))
        except WrongKey:  # a token these keys cannot read is not the one the work began with
            return False
        return stored == base

    def _record(self, conn: Any, writes: Sequence[GrantWrite]) -> None:
        profile_rows = [
            {"grant_id": w.grant.id, **_profile_values(w.profile)} for w in writes if w.profile
        ]
        if profile_rows:
            stmt = self._insert(profiles)
            # A "no profile" answer (errcode) keeps the last profile that was read.
            set_ = {
                k: case((stmt.excluded.errcode.is_(None), stmt.excluded[k]), else_=profiles.c[k])
                for k in _PROFILE_FIELDS
            }
            set_["errcode"] = stmt.excluded.errcode
            set_["fetched_at"] = stmt.excluded.fetched_at
            conn.execute(stmt.on_conflict_do_update(index_elements=["grant_id"], set_=set_),
                         profile_rows)
        cleared = [w.grant.id for w in writes if w.clear_reauth]
        if cleared:
            conn.execute(delete(reauth).where(reauth.c.grant_id.in_(cleared)))
        records = [
            {"grant_id": w.grant.id, "reason": w.reauth.reason, "errcode": w.reauth.errcode,
             "since": w.reauth.since}
            for w in writes if w.reauth
        ]
        if records:
            stmt = self._insert(reauth)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["grant_id"],
                    set_={"reason": stmt.excluded.reason, "errcode": stmt.excluded.errcode,
                          "since": stmt.excluded.since},
                ),
                records,
            )

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
