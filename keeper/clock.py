"""The host's clock, in one place. Everything that reads the time takes a ``clock`` (or a
``now``) parameter defaulting to :func:`utcnow`, so tests pass their own."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The host's current time, timezone-aware (UTC)."""
    return datetime.now(UTC)
