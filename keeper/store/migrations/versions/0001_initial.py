"""Grants, profiles, re-authorization records, sweep history, quota state.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keeper.store.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "grants",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("appid", sa.String(64), nullable=False),
        sa.Column("openid", sa.String(128), nullable=False),
        sa.Column("unionid", sa.String(128)),
        sa.Column("scope", sa.String(128), nullable=False),
        sa.Column("access_token", sa.Text, nullable=False),
        sa.Column("refresh_token", sa.Text, nullable=False),
        sa.Column("access_expires_at", UTCDateTime, nullable=False),
        sa.Column("refresh_issued_at", UTCDateTime, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("retry_at", UTCDateTime),
        sa.Column("last_error", sa.String(64)),
        sa.Column("profile_at", UTCDateTime),
        sa.Column("profile_stop", sa.Integer),
        sa.Column("refresh_due_at", UTCDateTime),
        sa.Column("access_due_at", UTCDateTime),
        sa.Column("profile_due_at", UTCDateTime),
        sa.Column("lease_id", sa.String(32)),
        sa.Column("lease_until", UTCDateTime),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("appid", "openid", name="uq_grants_appid_openid"),
    )
    for column in ("refresh_due_at", "access_due_at", "profile_due_at"):
        op.create_index(f"ix_grants_{column}", "grants", ["appid", column])
    op.create_table(
        "profiles",
        sa.Column(
            "grant_id", sa.Integer, sa.ForeignKey("grants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("nickname", sa.Text),
        sa.Column("sex", sa.String(16)),
        sa.Column("province", sa.Text),
        sa.Column("city", sa.Text),
        sa.Column("country", sa.Text),
        sa.Column("headimgurl", sa.Text),
        sa.Column("privilege", sa.Text),
        sa.Column("unionid", sa.String(128)),
        sa.Column("errcode", sa.Integer),
        sa.Column("fetched_at", UTCDateTime, nullable=False),
        sa.Column("avatar_url", sa.Text),
        sa.Column("avatar_sha256", sa.String(64)),
        sa.Column("avatar_path", sa.Text),
        sa.Column("avatar_size", sa.Integer),
        sa.Column("avatar_type", sa.String(32)),
        sa.Column("avatar_saved_at", UTCDateTime),
    )
    op.create_table(
        "reauth",
        sa.Column(
            "grant_id", sa.Integer, sa.ForeignKey("grants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("errcode", sa.Integer),
        sa.Column("since", UTCDateTime, nullable=False),
    )
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("summary", sa.Text),
    )
    op.create_index("ix_sweeps_finished_at", "sweeps", ["finished_at"])
    op.create_table(
        "quota_state",
        sa.Column("appid", sa.String(64), primary_key=True),
        sa.Column("endpoint", sa.String(16), primary_key=True),
        sa.Column("tat_us", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("quota_state", "sweeps", "reauth", "profiles", "grants"):
        op.drop_table(table)
