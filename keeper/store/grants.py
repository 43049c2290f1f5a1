"""The grant store (SQLAlchemy Core): what is due, leases, results, reports, quota state.

One class, one engine. Every public method is a short transaction; none holds a lock across a
WeChat call. Many processes share one database: work is claimed with a lease (a conditional
``UPDATE``; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and quotas are one compare-and-swap row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, bindparam, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from keeper.core.events import reauth_cleared
from keeper.core.models import Grant
from keeper.crypto import Cipher, WrongKey
from keeper.store.avatar_state import AvatarState
from keeper.store.db import ensure_schema, is_sqlite, make_engine, translate
from keeper.store.deliveries import Deliveries
from keeper.store.events import Outbox, record_events
from keeper.store.leases import Leases
from keeper.store.observe import Observations
from keeper.store.quota_state import QuotaState
from keeper.store.reports import Reports
from keeper.store.rows import MUTABLE, GrantWrite, grant_of, schedule_values
from keeper.store.schema import grants, meta, reauth
from keeper.store.users import Users


class Store(Leases, Reports, QuotaState, AvatarState, Users, Outbox, Deliveries,
            Observations):
    """The database behind keeper. ``auto_upgrade``: migrate on open (embedded SQLite)."""

    def __init__(
        self, url: str, *, cipher: Cipher, pool_size: int = 8, auto_upgrade: bool | None = None,
        timeout_s: float = 30.0, max_overflow: int | None = None, pooler: str = "none",
    ) -> None:
        self.url = url
        self.cipher = cipher
        #: ``database_pooler``: what sits between keeper and PostgreSQL (see make_engine).
        self.pooler = pooler
        self.engine: Engine = make_engine(url, pool_size=pool_size, max_overflow=max_overflow,
                                          timeout_s=timeout_s, pooler=pooler)
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
        values = {k: getattr(g, k) for k in MUTABLE}
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

        A new grant for a user clears their re-authorization record (``reauth.cleared``, in
        the same transaction), any lease (a sweep working the old tokens then loses its
        write, so the new tokens win) and any answer held about the old tokens. The profile
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
                **schedule_values(w.schedule),
                "lease_id": None, "lease_until": None, "created_at": now, "updated_at": now,
            })
        stmt = self._insert(grants)
        ex = stmt.excluded
        keep = {"profile_at", "profile_stop", "profile_failures", "profile_retry_at",
                "profile_error"}
        stmt = stmt.on_conflict_do_update(
            index_elements=["appid", "openid"],
            set_={
                **{k: ex[k] for k in (*MUTABLE, "key_id") if k not in keep},
                "profile_stop": func.coalesce(ex.profile_stop, grants.c.profile_stop),
                "refresh_due_at": ex.refresh_due_at,
                "access_due_at": ex.access_due_at,
                "profile_due_at": func.coalesce(grants.c.profile_due_at, ex.profile_due_at),
                "lease_id": None, "lease_until": None, "updated_at": now,
                # New tokens: an answer held about the old ones no longer concerns anyone.
                "held_errcode": None, "held_since": None, "held_until": None,
            },
        )
        with translate("storing grants"), self.engine.begin() as conn:
            conn.execute(stmt, rows)
            by_app: dict[str, list[str]] = {}
            for w in writes:
                by_app.setdefault(w.grant.appid, []).append(w.grant.openid)
            cleared: dict[int, str] = {}
            for appid, openids in by_app.items():
                ids = select(grants.c.id).where(
                    grants.c.appid == appid, grants.c.openid.in_(openids)
                )
                cleared.update((r.grant_id, r.reason) for r in conn.execute(
                    delete(reauth).where(reauth.c.grant_id.in_(ids))
                    .returning(reauth.c.grant_id, reauth.c.reason)))
            if cleared:
                who = conn.execute(select(grants.c.appid, grants.c.openid, grants.c.unionid,
                                          grants.c.id).where(grants.c.id.in_(list(cleared))))
                record_events(conn, [reauth_cleared(r.appid, r.openid, r.unionid,
                                                    cleared[r.id]) for r in who], now)
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
        return grant_of(row, self.cipher) if row else None
