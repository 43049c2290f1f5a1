"""The store's queries for metrics, the status page and the forecast, on SQLite and PostgreSQL:
they agree with ``status()`` and with what was stored, day boundaries included."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from keeper.core.models import EXPIRING, Reauth
from keeper.core.policy import after_reauth, schedule
from keeper.core.quota import Gcra, Quota, usage
from keeper.store import db
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite
from tests.conftest import TEST_CIPHER
from tests.store.test_grants import CLOCK, DAY, NOW, grant, put

LIFETIME_S = 30 * 86400.0


def test_grant_and_reauth_counts_by_app_sum_to_the_status_counts(store: Store) -> None:
    put(store, grant("a1"), grant("a2"), grant("a3"), grant("b1", appid="wx2"))
    [g] = store.claim(appids=["wx1"], cutoff=NOW + 400 * DAY, limit=1, lease_id="K",
                      lease_s=86400)
    dead, record = after_reauth(g, 40030, NOW)
    store.apply([GrantWrite(dead, schedule(dead, CLOCK), reauth=record)], "K", NOW)
    counts, reauth = store.grant_counts(), store.reauth_counts()
    assert counts == {("wx1", "active"): 2, ("wx1", "reauth"): 1, ("wx2", "active"): 1}
    assert reauth == {("wx1", "refresh_token_invalid"): 1}
    status = store.status(NOW)
    assert sum(counts.values()) == status["grants"] == 4
    assert sum(reauth.values()) == status["reauth_required"] == 1


def test_work_due_and_overdue_per_app_and_kind(store: Store) -> None:
    put(store,
        grant("fresh"),
        grant("access-due", access_expires_at=NOW + timedelta(minutes=1)),
        grant("access-long-due", access_expires_at=NOW - timedelta(hours=2)),
        grant("refresh-due", refresh_issued_at=NOW - 29 * DAY - timedelta(minutes=1)))
    due = store.due_counts(["wx1", "wx9"], NOW, NOW - timedelta(minutes=30))
    assert due[("wx1", "access")] == (2, 1)  # margin 5 min: due at expiry - 5 min
    assert due[("wx1", "refresh")] == (1, 0)
    assert due[("wx1", "profile")] == (0, 0)  # snsapi_base: no profile reads
    assert due[("wx9", "access")] == (0, 0)


def test_lapse_counts_bucket_live_grants_by_the_day_their_lifetime_ends(store: Store) -> None:
    start = datetime(2026, 11, 1, 16, 0, tzinfo=UTC)  # midnight, 2 November, in China
    issued0 = start - timedelta(seconds=LIFETIME_S)  # lapses at the first instant of day 0
    put(store,
        grant("day0-first", refresh_issued_at=issued0),
        grant("day0-last", refresh_issued_at=issued0 + DAY - timedelta(microseconds=1)),
        grant("day1", refresh_issued_at=issued0 + DAY),
        grant("day2-expiring", refresh_issued_at=issued0 + 2 * DAY + timedelta(hours=5)),
        grant("before", refresh_issued_at=issued0 - timedelta(seconds=1)),
        grant("after", refresh_issued_at=issued0 + 3 * DAY),
        grant("day1-dead", refresh_issued_at=issued0 + DAY + timedelta(hours=1)),
        grant("other-app", appid="wx2", refresh_issued_at=issued0))
    claimed = {g.openid: g for g in store.claim(appids=["wx1"], cutoff=NOW + 400 * DAY,
                                                 limit=100, lease_id="K",
                                                 lease_s=86400)}
    g = replace(claimed["day2-expiring"], state=EXPIRING)
    dead, record = after_reauth(claimed["day1-dead"], 42007, NOW)
    store.apply([GrantWrite(g, schedule(g, CLOCK),
                            reauth=Reauth("refresh_token_expiring", None, NOW)),
                 GrantWrite(dead, schedule(dead, CLOCK), reauth=record)], "K", NOW)
    assert store.lapse_counts("wx1", LIFETIME_S, start, 3) == {0: (2, 0), 1: (1, 0), 2: (1, 1)}
    assert store.lapse_counts("wx2", LIFETIME_S, start, 3) == {0: (1, 0)}


def test_the_last_finished_sweep_and_the_recent_ones(store: Store) -> None:
    assert store.last_sweep_finished_at() is None
    first = store.start_sweep(NOW, host="h", pid=1)
    store.finish_sweep(first, NOW + timedelta(seconds=3), {"seconds": 3})
    store.start_sweep(NOW + timedelta(minutes=1), host="h", pid=1)  # still running
    assert store.last_sweep_finished_at() == NOW + timedelta(seconds=3)
    recent = store.recent_sweeps(50)
    assert [s["finished_at"] for s in recent] == [None, NOW + timedelta(seconds=3)]
    assert recent[1]["summary"] == {"seconds": 3}


def test_quota_permits_are_counted_per_window_by_the_taking_statement(store: Store) -> None:
    period_us = round(Gcra.for_quota(Quota(100, 60)).period_us)
    t0 = int(datetime(2026, 11, 1, 12, 0, 10, tzinfo=UTC).timestamp() * 1_000_000)
    assert store.quota_tat("wx1", "refresh") == 0
    assert store.quota_swap("wx1", "refresh", 0, 10, permits=5, now_us=t0, period_us=period_us)
    assert store.quota_swap("wx1", "refresh", 10, 20, permits=3, now_us=t0 + 1_000_000,
                            period_us=period_us)
    assert not store.quota_swap("wx1", "refresh", 10, 30, permits=50, now_us=t0,
                                period_us=period_us)  # lost the race: nothing counted
    [row] = store.quota_rows()

    def used(at_us: int) -> tuple[int, int]:
        u = usage(row["window_us"], row["window_permits"], row["previous_permits"], at_us,
                  period_us)
        return u.current, u.previous

    assert used(t0) == (8, 0)
    assert used(t0 + 60_000_000) == (0, 8)  # the next minute
    assert used(t0 + 120_000_000) == (0, 0)
    next_minute = t0 + 60_000_000
    assert store.quota_swap("wx1", "refresh", 20, 40, permits=2, now_us=next_minute,
                            period_us=period_us)
    [row] = store.quota_rows()
    assert used(next_minute) == (2, 8)


def test_migration_0007_gives_existing_records_their_grants_app(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, target="0006")
    t = NOW.replace(tzinfo=None)
    with engine.begin() as conn:
        for gid, appid in ((7, "wx1"), (8, "wx2")):
            conn.execute(text(
                "INSERT INTO grants (id, appid, openid, scope, access_token, refresh_token, "
                "access_expires_at, refresh_issued_at, state, failures, created_at, "
                "updated_at) VALUES (:id, :a, 'o', 's', 'a', 'r', :t, :t, 'reauth', 0, :t, :t)"),
                {"id": gid, "a": appid, "t": t})
            conn.execute(text("INSERT INTO reauth (grant_id, reason, since, seq) "
                              "VALUES (:id, 'other', :t, :id)"), {"id": gid, "t": t})
    db.upgrade(engine)
    with engine.begin() as conn:
        assert dict(conn.execute(text("SELECT grant_id, appid FROM reauth")).all()) == {
            7: "wx1", 8: "wx2"}
    engine.dispose()
    store = Store(db_url, cipher=TEST_CIPHER).open()
    assert store.reauth_counts() == {("wx1", "other"): 1, ("wx2", "other"): 1}
    store.close()
