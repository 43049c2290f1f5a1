"""What the application API asks of the store about users: one token, forgetting a user, the
re-authorization feed and look-ups by unionid. A mixin of :class:`keeper.store.grants.Store`,
which provides ``engine`` and ``cipher``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Dialect, Engine, bindparam, delete, func, select

from keeper.clock import utcnow
from keeper.core.events import GRANT_DELETED, NewEvent
from keeper.crypto import Cipher
from keeper.store.db import translate
from keeper.store.events import record_events
from keeper.store.schema import grants, profiles, reauth


@dataclass(frozen=True)
class TokenRow:
    """What the token endpoint needs of a grant, access token decrypted (nothing else is)."""

    id: int
    state: str
    scope: str
    access_token: str
    access_expires_at: datetime
    leased_until: datetime | None  # a lease held on the grant (maybe lapsed), else None


#: The token look-up, built once: on the API's busiest path, building a Core statement and its
#: cache key cost more CPU than running it (``python -m bench api``).
_TOKEN_ROW = select(
    grants.c.id, grants.c.state, grants.c.scope, grants.c.access_token,
    grants.c.access_expires_at, grants.c.lease_id, grants.c.lease_until,
).where(grants.c.appid == bindparam("appid"), grants.c.openid == bindparam("openid"))


def token_row_of(row: Sequence[Any], decrypt: Callable[[str], str],
                 when: Callable[[Any], datetime] = lambda value: value) -> TokenRow:
    """A :class:`TokenRow` of ``_TOKEN_ROW``'s columns, in order, as any driver returns them
    (``when``: turns a stored time into an aware datetime where the driver did not)."""
    id_, state, scope, access_token, expires_at, lease_id, lease_until = row
    return TokenRow(id_, state, scope, decrypt(access_token), when(expires_at),
                    when(lease_until) if lease_id else None)


def token_row_sql(dialect: Dialect) -> str:
    """``_TOKEN_ROW`` as ``dialect``'s SQL, with the named parameters ``appid`` and ``openid``
    (for a driver used without SQLAlchemy: the API's token reader)."""
    return str(_TOKEN_ROW.compile(dialect=dialect))


class Users:
    """The API's reads and the one delete."""

    engine: Engine
    cipher: Cipher
    sqlite: bool

    def token_row(self, appid: str, openid: str) -> TokenRow | None:
        """One indexed read (the (appid, openid) unique index).

        A single SELECT needs no transaction: on PostgreSQL it runs in autocommit, which
        spares the BEGIN and ROLLBACK round trips psycopg would wrap it in. (SQLite's driver
        begins no transaction for a SELECT, and switching its mode costs a PRAGMA.)
        """
        with translate("reading a token"), self.engine.connect() as conn:
            if not self.sqlite:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            row = conn.execute(_TOKEN_ROW, {"appid": appid, "openid": openid}).first()
        return None if row is None else token_row_of(row, self.cipher.decrypt)

    def delete_user(self, appid: str, openid: str, *, now: datetime | None = None
                    ) -> tuple[bool, str | None]:
        """Forget a user: the grant, its profile and re-authorization record (both by cascade),
        and record ``grant.deleted`` in the same transaction.

        Returns (whether there was a grant, the avatar file it leaves unused). The caller
        removes that file: after the commit, and only a file no other profile points to.
        """
        now = now or utcnow()
        with translate("deleting a grant"), self.engine.begin() as conn:
            row = conn.execute(
                select(grants.c.id, grants.c.unionid, profiles.c.avatar_path)
                .outerjoin(profiles, profiles.c.grant_id == grants.c.id)
                .where(grants.c.appid == appid, grants.c.openid == openid)
                .with_for_update(of=grants)
            ).first()
            if row is None:
                return False, None
            # Explicit, not only by cascade: a database without enforced foreign keys forgets
            # the user as completely.
            conn.execute(delete(profiles).where(profiles.c.grant_id == row.id))
            conn.execute(delete(reauth).where(reauth.c.grant_id == row.id))
            conn.execute(delete(grants).where(grants.c.id == row.id))
            record_events(conn, [NewEvent(GRANT_DELETED, appid, openid, row.unionid)], now)
            path = row.avatar_path
            if path is not None:
                others = conn.execute(
                    select(func.count()).where(profiles.c.avatar_path == path)
                ).scalar_one()
                if others:
                    path = None
        return True, path

    def reauth_page(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Records written after cursor ``after``, in the order they were committed; the
        cursor of the last one (``after`` itself when there are none)."""
        q = (
            select(grants.c.appid, grants.c.openid, grants.c.unionid, reauth.c.reason,
                   reauth.c.errcode, reauth.c.since, reauth.c.seq)
            .join(grants, grants.c.id == reauth.c.grant_id)
            .where(reauth.c.seq > after)
            .order_by(reauth.c.seq)
            .limit(limit)
        )
        with translate("reading the re-authorization feed"), self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        cursor = rows[-1]["seq"] if rows else after
        for r in rows:
            r.pop("seq")
        return rows, int(cursor)

    def grants_by_unionid(self, unionid: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The grants of one WeChat user across the apps of one open platform account."""
        q = (select(grants.c.appid, grants.c.openid, grants.c.state)
             .where(grants.c.unionid == unionid)
             .order_by(grants.c.appid, grants.c.openid).limit(limit))
        with translate("looking up a unionid"), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def ping(self) -> None:
        """One round trip: raises StoreError when the database does not answer."""
        with translate("checking the database"), self.engine.connect() as conn:
            conn.execute(select(1))
