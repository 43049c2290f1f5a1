"""The outbox and its deliveries, on SQLite and PostgreSQL: events are written in the
transaction of their change (never without it), numbered in commit order, fanned out to each
webhook once, sent by one lease holder at a time, retried, failed, replayed and pruned."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from keeper.core.events import AVATAR_CHANGED, TYPES, next_attempt
from keeper.core.models import Profile
from keeper.core.policy import after_reauth, schedule
from keeper.store.avatar_state import AvatarDue
from keeper.store.deliveries import DELIVERED, FAILED, PENDING, Due
from keeper.store.events import record_events
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite
from keeper.store.schema import deliveries, events, reauth
from tests.conftest import TEST_CIPHER, pass_lease_time
from tests.store.test_grants import CLOCK, NOW, grant, put
from tests.store.test_users import record

HOOK = "abcdef012345"


def bodies(store: Store) -> list[dict[str, object]]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(events.c.body, events.c.seq).order_by(events.c.seq)).all()
    assert [r.seq for r in rows] == sorted({r.seq for r in rows})  # unique, increasing
    return [json.loads(r.body) for r in rows]


def next_due(store: Store, now: datetime) -> Due | None:
    due = store.due(HOOK, now, limit=1)
    return due[0] if due else None


def profile_write(store: Store, openid: str, profile: Profile) -> None:
    leased = store.claim_one("wx1", openid, lease_id="LP", now=NOW,
                             lease_s=300)
    assert leased is not None
    store.apply([GrantWrite(leased, schedule(leased, CLOCK), profile=profile)], "LP", NOW)


def test_a_committed_change_records_exactly_its_events(store: Store) -> None:
    put(store, grant("o1", unionid="u1"), grant("o2"), grant("o3"))
    record(store, "o1", "o2")
    got = bodies(store)
    assert [(b["type"], b["data"]["openid"]) for b in got] == [  # type: ignore[index]
        ("reauth.recorded", "o1"), ("reauth.recorded", "o2")]
    first = got[0]
    assert set(first) == {"id", "type", "created_at", "data"}
    assert str(first["id"]).startswith("evt_") and len(str(first["id"])) == 30
    assert first["created_at"] == "2026-11-01T12:00:00Z"
    assert first["data"] == {"appid": "wx1", "openid": "o1", "unionid": "u1",
                             "reason": "refresh_token_invalid", "errcode": 40030,
                             "since": "2026-11-01T12:00:00Z"}
    with store.engine.connect() as conn:
        raw = " ".join(conn.execute(select(events.c.body)).scalars())
    assert "AT-o1" not in raw and "RT-o1" not in raw  # never a token


def test_a_rolled_back_change_records_no_event(store: Store) -> None:
    put(store, grant("o1"))
    leased = store.claim_one("wx1", "o1", lease_id="L", now=NOW, lease_s=86400)
    assert leased is not None
    dead, rec = after_reauth(leased, 42007, NOW)
    with pytest.raises(RuntimeError), store.engine.begin() as conn:
        store._record(conn, [GrantWrite(dead, schedule(dead, CLOCK), reauth=rec)], NOW)
        assert conn.execute(select(func.count()).select_from(events)).scalar() == 1
        raise RuntimeError("the transaction fails after the change was written")
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(reauth)).scalar() == 0


def test_the_same_record_again_is_no_news_and_a_login_clears_it_with_its_reason(
    store: Store,
) -> None:
    put(store, grant("o1"))
    record(store, "o1")
    record(store, "o1")  # the same reason and errcode: nothing new to tell
    record(store, "o1", errcode=42002)  # something new
    put(store, grant("o1"))  # a new login or import clears the record
    put(store, grant("o1"))  # nothing left to clear
    got = [(b["type"], b["data"].get("reason")) for b in bodies(store)]  # type: ignore[union-attr]
    assert got == [("reauth.recorded", "refresh_token_invalid"),
                   ("reauth.recorded", "refresh_token_expired"),
                   ("reauth.cleared", "refresh_token_expired")]


def test_profile_changed_names_what_changed_and_nothing_else(store: Store) -> None:
    put(store, grant("o1", scope="snsapi_login", unionid="u1"))
    first = Profile(NOW, nickname="Li", sex=0, headimgurl="https://wx.qlogo.cn/a/132",
                    privilege=("x",))
    profile_write(store, "o1", first)  # the first profile read is no change
    profile_write(store, "o1", replace(first, fetched_at=NOW + timedelta(1)))  # the same
    profile_write(store, "o1", Profile(NOW, errcode=50001))  # no profile: the old one stays
    profile_write(store, "o1", replace(first, nickname="李雷", privilege=()))
    got = bodies(store)
    assert [b["type"] for b in got] == ["profile.changed"]
    assert got[0]["data"] == {"appid": "wx1", "openid": "o1", "unionid": "u1",
                              "changed": {"nickname": "李雷", "privilege": []}}
    # sex as WeChat's integer, in the event as in the profile.
    profile_write(store, "o1", replace(first, nickname="李雷", privilege=(), sex=2))
    assert bodies(store)[1]["data"]["changed"] == {"sex": 2}  # type: ignore[index]


def test_delete_and_a_changed_avatar_are_events_the_first_avatar_copy_is_not(
    store: Store,
) -> None:
    put(store, grant("o1", scope="snsapi_login"), grant("o2", unionid="u2"))
    profile_write(store, "o1", Profile(NOW, nickname="a", headimgurl="https://h/1"))
    (gid,) = [g for g in [store.get_grant("wx1", "o1")] if g]
    due = AvatarDue(gid.id, "wx1", "o1", "https://h/1", None, None, None)
    assert store.record_avatar(due, now=NOW, sha256="a" * 64, path="p1", size=1, mime="x")
    changed = replace(due, avatar_url="https://h/1", avatar_sha256="a" * 64)
    assert store.record_avatar(changed, now=NOW, sha256="a" * 64, path="p1", size=1, mime="x")
    assert store.record_avatar(changed, now=NOW, sha256="b" * 64, path="p2", size=1, mime="x")
    assert store.delete_user("wx1", "o2", now=NOW) == (True, None)
    got = bodies(store)
    assert [b["type"] for b in got] == [AVATAR_CHANGED, "grant.deleted"]
    assert got[0]["data"]["old_sha256"] == "a" * 64  # type: ignore[index]
    assert got[0]["data"]["new_sha256"] == "b" * 64  # type: ignore[index]
    assert got[1]["data"] == {"appid": "wx1", "openid": "o2", "unionid": "u2"}


def test_a_new_webhook_starts_at_the_newest_event_then_gets_each_wanted_one_once(
    store: Store,
) -> None:
    put(store, *(grant(f"o{i}") for i in range(5)))
    record(store, "o0")  # before the webhook existed: history, not sent
    assert store.take_webhook(HOOK, "A", now=NOW, lease_s=30)
    assert store.fan_out(HOOK, "A", TYPES, now=NOW) == 0
    record(store, "o1", "o2")
    put(store, grant("o1"))  # reauth.cleared, which this webhook does not want
    assert store.fan_out(HOOK, "A", {"reauth.recorded"}, now=NOW) == 3  # events passed
    assert store.fan_out(HOOK, "A", TYPES, now=NOW) == 0
    with store.engine.connect() as conn:
        rows = conn.execute(select(deliveries.c.event_id, deliveries.c.state)
                            .order_by(deliveries.c.seq)).all()
    assert len(rows) == 2 and {r.state for r in rows} == {PENDING}
    first = next_due(store, NOW)
    assert first is not None and first.event_id == rows[0].event_id
    assert json.loads(first.body)["data"]["openid"] == "o1"


def test_one_holder_at_a_time_and_a_lapsed_or_dead_holder_is_taken_over(store: Store) -> None:
    # Leases run on the database's clock: pass_lease_time moves it on (keeper.store.clock).
    assert store.take_webhook(HOOK, "A", now=NOW, lease_s=30)
    pass_lease_time(store, 10)
    assert not store.take_webhook(HOOK, "B", now=NOW, lease_s=30)
    assert store.fan_out(HOOK, "B", TYPES, now=NOW) is None  # B holds nothing
    assert store.take_webhook(HOOK, "A", now=NOW, lease_s=30)  # renew: 30 s from now
    pass_lease_time(store, 20)
    assert not store.take_webhook(HOOK, "B", now=NOW, lease_s=30)
    pass_lease_time(store, 11)
    assert store.take_webhook(HOOK, "B", now=NOW, lease_s=30)  # lapsed
    assert store.fan_out(HOOK, "A", TYPES, now=NOW) is None  # A lost it
    assert store.take_webhook(HOOK, "C", now=NOW, lease_s=30, takeover="B")
    store.release_webhook(HOOK, "B")  # not B's any more: changes nothing
    assert store.webhook_holder(HOOK) == "C"
    store.release_webhook(HOOK, "C")
    assert store.take_webhook(HOOK, "D", now=NOW, lease_s=30)


def test_a_failing_delivery_is_retried_for_72_hours_then_failed_and_replay_revives_it(
    store: Store,
) -> None:
    put(store, grant("o1"), grant("o2"))
    assert store.take_webhook(HOOK, "A", now=NOW, lease_s=30)
    record(store, "o1", "o2")
    store.fan_out(HOOK, "A", TYPES, now=NOW)
    now, attempts = NOW, 0
    while (due := next_due(store, now)) is not None:
        attempts += 1
        retry = next_attempt(due.attempts + 1, due.first_try_at, now, draw=0.5)
        store.settle(HOOK, due, now=now, state=PENDING if retry else FAILED,
                     next_attempt_at=retry, status=503, error="HTTP 503")
        if retry is not None:
            # The other event is not held up behind it: it was due as well.
            now = min(retry, now + timedelta(hours=1))
    assert 70 < attempts < 400
    assert (now - NOW) >= timedelta(hours=72)
    assert store.delivery_counts() == {"events_pending": 0, "events_failed": 2}
    failed = list(store.iter_events(failed_only=True))
    assert [d["last_status"] for e in failed for d in e["deliveries"]] == [503, 503]
    assert store.replay(now, event_id=failed[0]["id"]) == 1
    assert store.delivery_counts() == {"events_pending": 1, "events_failed": 1}
    assert store.replay(now) == 1  # every failed one
    due = next_due(store, now)
    assert due is not None and due.attempts == 0
    assert store.settle(HOOK, due, now=now, state=DELIVERED, next_attempt_at=None,
                        status=204, error=None)
    assert not store.settle(HOOK, due, now=now, state=DELIVERED, next_attempt_at=None,
                            status=204, error=None)  # written once
    assert store.delivery_counts() == {"events_pending": 1, "events_failed": 0}


def test_prune_forgets_old_events_no_webhook_still_has_to_send(store: Store) -> None:
    put(store, *(grant(f"o{i}") for i in range(3)))
    assert store.take_webhook(HOOK, "A", now=NOW, lease_s=30)
    record(store, "o0", "o1")
    store.fan_out(HOOK, "A", {"reauth.recorded"}, now=NOW)
    put(store, grant("o0"))  # reauth.cleared: no webhook wants it
    due = next_due(store, NOW)
    assert due is not None
    store.settle(HOOK, due, now=NOW, state=DELIVERED, next_attempt_at=None, status=200,
                 error=None)
    week = 7 * 86400
    assert store.prune_events(NOW + timedelta(days=6), week) == 0
    assert store.prune_events(NOW + timedelta(days=8), week) == 2  # delivered, unwanted
    assert [e["data"]["openid"] for e in bodies(store)] == ["o1"]  # type: ignore[index]
    assert store.delivery_counts()["events_pending"] == 1


def test_events_recorded_by_hand_roll_back_with_their_transaction(store: Store) -> None:
    from keeper.core.events import NewEvent

    with pytest.raises(ZeroDivisionError), store.engine.begin() as conn:
        record_events(conn, [NewEvent("grant.deleted", "wx1", "o", None)], NOW)
        _ = 1 / 0
    assert bodies(store) == []
    assert Store(store.url, cipher=TEST_CIPHER).events_top() == 0
