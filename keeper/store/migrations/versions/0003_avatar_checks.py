"""Avatar bookkeeping: which profiles need their avatar checked, and why a download was refused.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("avatar_due", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("avatar_error", sa.String(120)))
    op.create_index("ix_profiles_avatar_due", "profiles", ["avatar_due"])
    # Profiles read before this revision get their avatar copied on the next sweep.
    op.execute(sa.text("UPDATE profiles SET avatar_due = true "
                       "WHERE headimgurl IS NOT NULL AND headimgurl <> '' AND errcode IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_profiles_avatar_due", "profiles")
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("avatar_error")
        batch.drop_column("avatar_due")
