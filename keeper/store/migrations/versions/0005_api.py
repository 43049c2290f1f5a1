"""The application API: the re-authorization feed's order, and look-ups by unionid.

``reauth.seq`` orders re-authorization records as they were committed (from the new
``counters`` table, under its row lock), so ``GET /v1/reauth`` pages through them with a
cursor and a poller sees every record exactly once. Existing records take their grant's id.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    with op.batch_alter_table("reauth") as batch:
        batch.add_column(sa.Column("seq", sa.BigInteger))
    op.execute(sa.text("UPDATE reauth SET seq = grant_id"))
    op.execute(sa.text(
        "INSERT INTO counters (name, value) SELECT 'reauth', COALESCE(MAX(seq), 0) FROM reauth"
    ))
    with op.batch_alter_table("reauth") as batch:
        batch.alter_column("seq", existing_type=sa.BigInteger, nullable=False)
        batch.create_index("ix_reauth_seq", ["seq"], unique=True)
    op.create_index("ix_grants_unionid", "grants", ["unionid"])


def downgrade() -> None:
    op.drop_index("ix_grants_unionid", "grants")
    with op.batch_alter_table("reauth") as batch:
        batch.drop_index("ix_reauth_seq")
        batch.drop_column("seq")
    op.drop_table("counters")
