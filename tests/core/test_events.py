"""The pure event model: bodies, what counts as a profile change, and the retry schedule."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from keeper.core.events import (
    RETRY_CAP_S,
    RETRY_FOR_S,
    NewEvent,
    body,
    new_event_id,
    next_attempt,
    profile_changes,
)
from keeper.core.models import Profile

NOW = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


def test_a_body_is_the_contracts_shape_in_utc() -> None:
    event = NewEvent("grant.deleted", "wx1", "o1", None, {"extra": 1})
    text = body("evt_x", event, datetime(2026, 11, 30, 16, 0, tzinfo=UTC) + timedelta(0))
    assert json.loads(text) == {"id": "evt_x", "type": "grant.deleted",
                                "created_at": "2026-11-30T16:00:00Z",
                                "data": {"appid": "wx1", "openid": "o1", "unionid": None,
                                         "extra": 1}}
    ids = {new_event_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 30 and i.startswith("evt_") for i in ids)


def test_only_a_later_profile_that_differs_is_a_change() -> None:
    new = Profile(NOW, nickname="b", sex=1, privilege=("x",))
    assert profile_changes(None, new) == {}  # the first profile ever
    assert profile_changes({"nickname": None, "privilege": []}, new) == {}  # never had one
    old = {"nickname": "a", "sex": 1, "privilege": ["x"], "province": None, "city": None,
           "country": None, "headimgurl": None, "unionid": None}
    assert profile_changes(old, new) == {"nickname": "b"}
    assert profile_changes(old, Profile(NOW, errcode=50001)) == {}  # no profile: no news


def test_retries_begin_within_a_minute_grow_to_an_hour_and_end_after_72_hours() -> None:
    first = NOW
    assert timedelta(seconds=30) <= next_attempt(1, first, NOW, draw=0) - NOW  # type: ignore[operator]
    assert next_attempt(1, first, NOW, draw=0.999) - NOW < timedelta(seconds=60)  # type: ignore[operator]
    late = next_attempt(40, first, NOW, draw=0.999)
    assert late is not None and late - NOW <= timedelta(seconds=RETRY_CAP_S)
    # Failing every time, attempts go on for at least 72 hours, then stop.
    now, n, gaps = NOW, 0, []
    while (at := next_attempt(n + 1, first, now, draw=1.0)) is not None:
        gaps.append((at - now).total_seconds())
        now, n = at, n + 1
    assert (now - first).total_seconds() >= RETRY_FOR_S
    assert gaps == sorted(gaps) and max(gaps) == RETRY_CAP_S and 70 < n < 90
