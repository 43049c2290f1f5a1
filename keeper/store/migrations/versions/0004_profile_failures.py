"""Profile reads back off on their own, and website logins (snsapi_login) read profiles.

A profile read that fails no longer delays the grant's token refreshes: it has its own count,
retry time and last error. Grants with scope ``snsapi_login`` (a website's QR login), which
keeper did not read profiles for before this revision, have their first read due at once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keeper.store.schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("grants") as batch:
        batch.add_column(sa.Column("profile_failures", sa.Integer, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("profile_retry_at", UTCDateTime))
        batch.add_column(sa.Column("profile_error", sa.String(64)))
    op.execute(sa.text(
        "UPDATE grants SET profile_due_at = refresh_issued_at "
        "WHERE profile_due_at IS NULL AND state <> 'reauth' AND profile_stop IS NULL "
        "AND (',' || replace(scope, ' ', '') || ',') LIKE '%,snsapi_login,%'"
    ))


def downgrade() -> None:
    with op.batch_alter_table("grants") as batch:
        batch.drop_column("profile_error")
        batch.drop_column("profile_retry_at")
        batch.drop_column("profile_failures")
