"""Events: the transactional outbox, and its delivery to each webhook.

``events`` holds each event as the exact JSON text sent, numbered by ``seq`` from the
``counters`` row ``events`` (taken under its row lock, so numbers follow commit order: a reader
that has seen seq k has seen every event below it). ``webhooks`` holds one row per webhook (a
key made from its url): how far its events were fanned out, and the lease of the one process
that sends to it. ``deliveries`` holds one row per (webhook, event) to send.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from keeper.store.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _time(name: str, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, UTCDateTime, nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("appid", sa.String(64), nullable=False),
        sa.Column("openid", sa.String(128), nullable=False),
        _time("created_at", nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_events_seq", "events", ["seq"], unique=True)
    op.create_index("ix_events_created_at", "events", ["created_at"])
    op.create_table(
        "webhooks",
        sa.Column("key", sa.String(16), primary_key=True),
        sa.Column("cursor", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.String(96)),
        _time("lease_until"),
    )
    op.create_table(
        "deliveries",
        sa.Column("webhook", sa.String(16), primary_key=True),
        sa.Column("event_id", sa.String(32), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        _time("next_attempt_at"),
        _time("first_try_at", nullable=False),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.String(120)),
        _time("delivered_at"),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["webhook", "state", "next_attempt_at"])
    op.create_index("ix_deliveries_event", "deliveries", ["event_id"])
    op.create_index("ix_deliveries_state", "deliveries", ["state"])
    op.execute(sa.text("INSERT INTO counters (name, value) VALUES ('events', 0)"))


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM counters WHERE name = 'events'"))
    op.drop_table("deliveries")
    op.drop_table("webhooks")
    op.drop_table("events")
