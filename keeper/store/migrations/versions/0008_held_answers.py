"""Takeovers and held answers: a definitive answer that a frozen holder's newer tokens may
explain is held for one lease before it is recorded.

``grants.taken_over``: set by each claim, whether the grant was leased from a holder whose
lease lapsed unreleased. ``held_errcode``, ``held_since``, ``held_until``: WeChat's 40030 or
42002 heard after such a takeover, kept unconfirmed until ``held_until`` (the database's
clock); claims skip the grant until then. Existing rows hold nothing and were taken over by
nobody.

The columns are added and dropped in place (``ALTER TABLE``), never by Alembic's batch copy:
on SQLite that copy drops ``grants`` and renames a new table in its place, and with foreign
keys on, dropping it deletes every profile and re-authorization record with it. So the
default is a plain string (a SQL expression would make Alembic copy the table).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keeper.store.schema import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("grants", sa.Column("taken_over", sa.Boolean, nullable=False,
                                      server_default="0"))
    op.add_column("grants", sa.Column("held_errcode", sa.Integer))
    op.add_column("grants", sa.Column("held_since", UTCDateTime))
    op.add_column("grants", sa.Column("held_until", UTCDateTime))


def downgrade() -> None:
    # In place (SQLite 3.35 or later). A held answer goes with its columns; the grant is
    # due again, and the next refresh asks WeChat anew.
    for name in ("held_until", "held_since", "held_errcode", "taken_over"):
        op.drop_column("grants", name)
