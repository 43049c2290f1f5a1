"""The tables. Alembic migrations (keeper/migrations) create them; this is what code queries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every database.

    SQLite stores naive ISO strings, which sort chronologically only if every value is UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; keeper uses aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


metadata = MetaData()

grants = Table(
    "grants",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("appid", String(64), nullable=False),
    Column("openid", String(128), nullable=False),
    Column("unionid", String(128)),
    Column("scope", String(128), nullable=False),
    Column("access_token", Text, nullable=False),
    Column("refresh_token", Text, nullable=False),
    Column("access_expires_at", UTCDateTime, nullable=False),
    Column("refresh_issued_at", UTCDateTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("failures", Integer, nullable=False, default=0),
    Column("retry_at", UTCDateTime),
    Column("last_error", String(64)),
    Column("profile_at", UTCDateTime),
    Column("profile_stop", Integer),
    Column("profile_failures", Integer, nullable=False, default=0, server_default="0"),
    Column("profile_retry_at", UTCDateTime),
    Column("profile_error", String(64)),
    # When each kind of work falls due (NULL: never). A lease pushes them to the lease's end,
    # so the due queries skip leased grants and a crashed worker's grants come back by themselves.
    Column("refresh_due_at", UTCDateTime),
    Column("access_due_at", UTCDateTime),
    Column("profile_due_at", UTCDateTime),
    Column("lease_id", String(32)),
    # Which key encrypted the two tokens (a fingerprint, see keeper.crypto.key_id).
    Column("key_id", String(16)),
    Column("lease_until", UTCDateTime),
    # Set by each claim: whether it took the grant over from a lease that lapsed unreleased
    # (its holder may be frozen with newer tokens; migration 0008).
    Column("taken_over", Boolean, nullable=False, default=False, server_default="0"),
    # WeChat's definitive answer held unconfirmed (40030, 42002 heard after a takeover): its
    # errcode, when it was given, and until when (the database's clock) the earlier holder
    # may write the tokens' successor. Claims skip the grant until then; whoever claims it
    # after confirms the answer as a record, unless a write of newer tokens cleared it.
    Column("held_errcode", Integer),
    Column("held_since", UTCDateTime),
    Column("held_until", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("appid", "openid", name="uq_grants_appid_openid"),
    # Quotas are per app, so grants are claimed per app: (appid, due) serves "this app's
    # grants due by then, most urgent first" as one range scan, on every database and
    # whatever the planner's statistics say.
    Index("ix_grants_refresh_due_at", "appid", "refresh_due_at"),
    Index("ix_grants_access_due_at", "appid", "access_due_at"),
    Index("ix_grants_profile_due_at", "appid", "profile_due_at"),
    Index("ix_grants_key_id", "key_id"),  # what `keeper rotate-key` has left to do
    Index("ix_grants_unionid", "unionid"),  # the API's look-up by unionid
    # Metrics and the status page: grants by app and state as an index-only scan, and the
    # re-login forecast (live grants by the day their refresh token's lifetime ends) as a
    # range scan per app and state.
    Index("ix_grants_state", "appid", "state", "refresh_issued_at"),
)

profiles = Table(
    "profiles",
    metadata,
    Column("grant_id", Integer, ForeignKey("grants.id", ondelete="CASCADE"), primary_key=True),
    Column("nickname", Text),
    Column("sex", Integer),  # WeChat's code: 0 unknown, 1 male, 2 female (migration 0009)
    Column("province", Text),
    Column("city", Text),
    Column("country", Text),
    Column("headimgurl", Text),
    Column("privilege", Text),  # JSON list
    Column("unionid", String(128)),
    Column("errcode", Integer),  # set when WeChat had no profile to give (48001, 50001, 50002)
    Column("fetched_at", UTCDateTime, nullable=False),
    Column("avatar_url", Text),
    Column("avatar_sha256", String(64)),
    Column("avatar_path", Text),
    Column("avatar_size", Integer),
    Column("avatar_type", String(32)),
    Column("avatar_saved_at", UTCDateTime),
    # Set by every profile read that returned a profile; cleared once its avatar was checked.
    Column("avatar_due", Boolean, nullable=False, default=False),
    Column("avatar_error", String(120)),  # why the last download was refused
    Index("ix_profiles_avatar_due", "avatar_due"),
)

reauth = Table(
    "reauth",
    metadata,
    Column("grant_id", Integer, ForeignKey("grants.id", ondelete="CASCADE"), primary_key=True),
    Column("reason", String(32), nullable=False),
    Column("errcode", Integer),
    Column("since", UTCDateTime, nullable=False),
    # The order records were written in, for the API's feed: taken from ``counters`` under
    # its row lock, so a record with a higher ``seq`` is never committed before a lower one.
    Column("seq", BigInteger, nullable=False),
    # The grant's app, kept beside its record (a grant's appid never changes) so that records
    # by app and reason are counted from an index, without joining a large grants table.
    Column("appid", String(64), nullable=False),
    Index("ix_reauth_seq", "seq", unique=True),
    Index("ix_reauth_appid_reason", "appid", "reason"),
)

counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

sweeps = Table(
    "sweeps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("summary", Text),  # JSON object
    Index("ix_sweeps_finished_at", "finished_at"),
)

quota_state = Table(
    "quota_state",
    metadata,
    Column("appid", String(64), primary_key=True),
    Column("endpoint", String(16), primary_key=True),
    Column("tat_us", BigInteger, nullable=False),  # GCRA theoretical arrival time, Unix µs
    # Permits taken in the quota window starting at window_us (Unix µs), and in the one
    # before it: what the status page shows as quota used. Written by the same statement as
    # tat_us.
    Column("window_us", BigInteger, nullable=False, server_default="0"),
    Column("window_permits", BigInteger, nullable=False, server_default="0"),
    Column("previous_permits", BigInteger, nullable=False, server_default="0"),
)

meta = Table(
    "keeper_meta",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", Text, nullable=False),
)

#: The outbox (migration 0006): one row per event, its body the exact JSON text sent.
events = Table(
    "events",
    metadata,
    Column("id", String(32), primary_key=True),
    # From ``counters`` under its row lock: numbers follow commit order (see take_seqs).
    Column("seq", BigInteger, nullable=False),
    Column("type", String(32), nullable=False),
    Column("appid", String(64), nullable=False),
    Column("openid", String(128), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("body", Text, nullable=False),
    Index("ix_events_seq", "seq", unique=True),
    Index("ix_events_created_at", "created_at"),
)

#: One row per webhook (``key``, from its url): how far events were fanned out to it, and
#: the lease of the one process sending to it.
webhooks = Table(
    "webhooks",
    metadata,
    Column("key", String(16), primary_key=True),
    Column("cursor", BigInteger, nullable=False),
    Column("holder", String(96)),
    Column("lease_until", UTCDateTime),
)

#: One row per (webhook, event) to send: pending (due at ``next_attempt_at``), delivered or
#: failed.
deliveries = Table(
    "deliveries",
    metadata,
    Column("webhook", String(16), primary_key=True),
    Column("event_id", String(32), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime),
    Column("first_try_at", UTCDateTime, nullable=False),
    Column("last_status", Integer),
    Column("last_error", String(120)),
    Column("delivered_at", UTCDateTime),
    Index("ix_deliveries_due", "webhook", "state", "next_attempt_at"),
    Index("ix_deliveries_event", "event_id"),
    Index("ix_deliveries_state", "state"),
)
