"""Tokens encrypted at rest: a key id per grant, a key check, and every stored token encrypted.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Tokens stored in plaintext before this revision are encrypted here, in batches, with the
primary key keeper passes in (``keeper db upgrade`` and the embedded SQLite's self-upgrade do).
No token is lost or changed: each is decrypted and compared before its row is written.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("grants") as batch:
        batch.add_column(sa.Column("key_id", sa.String(16)))
    op.create_index("ix_grants_key_id", "grants", ["key_id"])
    op.create_table(
        "keeper_meta",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    cipher = context.config.attributes.get("cipher")
    conn = op.get_bind()
    grants = sa.table("grants", sa.column("id", sa.Integer), sa.column("access_token", sa.Text),
                      sa.column("refresh_token", sa.Text), sa.column("key_id", sa.String))
    if cipher is None:
        if conn.execute(sa.select(sa.func.count()).select_from(grants)).scalar():
            raise RuntimeError("stored tokens must be encrypted: run `keeper db upgrade`, "
                               "which passes the encryption key to this migration")
        return
    last = 0
    while True:
        rows = conn.execute(
            sa.select(grants.c.id, grants.c.access_token, grants.c.refresh_token)
            .where(grants.c.id > last, grants.c.key_id.is_(None))
            .order_by(grants.c.id).limit(BATCH)
        ).all()
        if not rows:
            break
        params = []
        for row in rows:
            access, refresh = cipher.encrypt(row.access_token), cipher.encrypt(row.refresh_token)
            if cipher.decrypt(access) != row.access_token or (
                cipher.decrypt(refresh) != row.refresh_token
            ):
                raise RuntimeError(f"grant {row.id}: encryption did not round-trip")
            params.append({"b_id": row.id, "a": access, "r": refresh, "k": cipher.primary_id})
        conn.execute(
            grants.update().where(grants.c.id == sa.bindparam("b_id"))
            .values(access_token=sa.bindparam("a"), refresh_token=sa.bindparam("r"),
                    key_id=sa.bindparam("k")),
            params,
        )
        last = rows[-1].id


def downgrade() -> None:
    raise RuntimeError("0002 cannot be undone: tokens would have to be written in plaintext")
