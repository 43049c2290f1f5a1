"""The one form of a time on keeper's wire (API, events, JSON outputs)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from keeper.core.events import reauth_recorded
from keeper.core.models import Reauth
from keeper.core.timestamps import json_default, timestamp


def test_a_time_is_rfc_3339_utc_whole_seconds_with_a_z() -> None:
    at = datetime(2026, 11, 30, 16, 0, 5, 999_999, tzinfo=timezone(timedelta(hours=8)))
    assert timestamp(at) == "2026-11-30T08:00:05Z"  # in UTC, the fraction cut (not rounded)
    assert timestamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert timestamp(datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0999-01-02T03:04:05Z"
    with pytest.raises(ValueError, match="naive"):
        timestamp(datetime(2026, 1, 2))  # keeper never holds a naive time


def test_an_event_and_a_json_output_show_one_time_alike() -> None:
    since = datetime(2026, 11, 30, 8, 0, 0, 105_415, tzinfo=UTC)
    event = reauth_recorded("wx1", "o1", None, Reauth("other", 40003, since))
    assert event.extra["since"] == json.loads(json.dumps(
        {"since": since}, default=json_default))["since"] == "2026-11-30T08:00:00Z"
    assert json_default(b"x") == "b'x'"  # anything else: its text, as before
