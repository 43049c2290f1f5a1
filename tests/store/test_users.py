"""The API's side of the store: the re-authorization feed (every record once, in commit
order), forgetting a user, look-ups by unionid, and migration 0005."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from keeper.core.models import Profile
from keeper.core.policy import after_reauth, schedule
from keeper.store import db
from keeper.store.grants import Store
from keeper.store.leases import take_seqs
from keeper.store.rows import GrantWrite
from keeper.store.schema import reauth
from tests.conftest import require_postgres, reset_postgres, wait_for
from tests.store.test_grants import CLOCK, NOW, grant, put


def record(store: Store, *openids: str, errcode: int = 40030) -> None:
    """A sweep records these users as must-re-authorize (through apply, as sweeps do)."""
    writes = []
    for openid in openids:
        leased = store.claim_one("wx1", openid, lease_id="LR", now=NOW,
                                 lease_s=300)
        assert leased is not None
        dead, rec = after_reauth(leased, errcode, NOW)
        writes.append(GrantWrite(dead, schedule(dead, CLOCK), reauth=rec))
    store.apply(writes, "LR", NOW)


def page_all(store: Store, after: int, limit: int) -> tuple[list[str], int]:
    seen = []
    while True:
        rows, nxt = store.reauth_page(after, limit)
        seen += [r["openid"] for r in rows]
        if not rows:
            return seen, after
        assert nxt > after
        after = nxt


def test_the_feed_pages_every_record_once_and_then_only_what_was_written_since(
    store: Store,
) -> None:
    put(store, *(grant(f"o{i}") for i in range(10)))
    record(store, "o3", "o1", "o7")
    record(store, "o0", "o9")
    seen, cursor = page_all(store, 0, 2)
    assert seen == ["o3", "o1", "o7", "o0", "o9"]  # in the order written
    rows, _ = store.reauth_page(0, 1)
    assert set(rows[0]) == {"appid", "openid", "unionid", "reason", "errcode", "since"}
    assert rows[0]["reason"] == "refresh_token_invalid" and rows[0]["errcode"] == 40030
    assert store.reauth_page(cursor, 100) == ([], cursor)

    record(store, "o5")
    # A new login clears o3's record; a record written again (o1) comes again, once.
    put(store, grant("o3"), grant("o1"))
    record(store, "o1", errcode=42002)
    seen, cursor = page_all(store, cursor, 1)
    assert seen == ["o5", "o1"]
    assert [r["openid"] for r in store.reauth_page(0, 100)[0]] == ["o7", "o0", "o9", "o5", "o1"]


@pytest.mark.db
def test_feed_numbers_are_taken_in_commit_order_on_postgresql() -> None:
    """A writer that took number k holds the counter until it commits: a writer after it
    waits, so no reader ever sees k+1 before k."""
    url = require_postgres()
    reset_postgres()
    engine = db.make_engine(url)
    db.upgrade(engine)
    first = engine.connect()
    try:
        tx = first.begin()
        assert list(take_seqs(first, "reauth", 2)) == [1, 2]
        holder = first.execute(text("SELECT pg_backend_pid()")).scalar_one()
        taken: list[int] = []
        second = threading.Thread(target=lambda: taken.extend(_take(engine, 1)))
        second.start()
        with engine.connect() as watcher:
            # The second writer waits for the first: a session blocked by the first's backend
            # (any other session of this run's database, blocked or not, is not counted).
            wait_for(lambda: watcher.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND :holder = ANY(pg_blocking_pids(pid))"),
                {"holder": holder}).scalar_one() == 1)
        assert taken == []  # still waiting for the first to commit
        tx.commit()
    finally:
        # Closed whatever happened: a connection left in its transaction would be collected
        # in some later test, which would then see its rollback fail.
        first.close()
    second.join(10)
    assert taken == [3]
    engine.dispose()


def _take(engine: object, n: int) -> list[int]:
    with engine.begin() as conn:  # type: ignore[attr-defined]
        return list(take_seqs(conn, "reauth", n))


def test_delete_forgets_everything_and_names_the_avatar_file_once_unused(store: Store) -> None:
    put(store, grant("a", unionid="u1"), grant("b", unionid="u1"), grant("c"))
    got = {o: store.claim_one("wx1", o, lease_id="L1", lease_s=300,
                              now=NOW) for o in "abc"}
    profile = Profile(fetched_at=NOW, nickname="n", headimgurl="http://img/x")
    store.apply([GrantWrite(g, schedule(g, CLOCK), profile=profile) for g in got.values()
                 if g is not None], "L1", NOW)
    assert len(store.due_avatars(10)) == 3
    for due in store.due_avatars(10):
        path = "ab/shared.png" if due.openid in "ab" else "cd/own.png"
        assert store.record_avatar(due, now=NOW, sha256="0" * 64, path=path, size=1,
                                   mime="image/png")
    record(store, "a")
    assert store.grants_by_unionid("u1") == [
        {"appid": "wx1", "openid": "a", "state": "reauth"},
        {"appid": "wx1", "openid": "b", "state": "active"},
    ]
    assert store.delete_user("wx1", "a") == (True, None)  # b still uses the file
    assert store.delete_user("wx1", "a") == (False, None)
    assert store.get_grant("wx1", "a") is None
    assert store.reauth_page(0, 10)[0] == []
    assert store.grants_by_unionid("u1") == [{"appid": "wx1", "openid": "b", "state": "active"}]
    assert store.delete_user("wx1", "b") == (True, "ab/shared.png")
    assert store.delete_user("wx1", "c") == (True, "cd/own.png")
    with store.engine.connect() as conn:
        assert conn.execute(select(reauth)).all() == []
        assert conn.execute(text("SELECT count(*) FROM profiles")).scalar_one() == 0


def test_migration_0005_numbers_existing_records(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, target="0004")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO grants (id, appid, openid, scope, access_token, refresh_token, "
            "access_expires_at, refresh_issued_at, state, failures, created_at, updated_at) "
            "VALUES (7, 'wx1', 'o7', 's', 'a', 'r', :t, :t, 'reauth', 0, :t, :t)"),
            {"t": NOW.replace(tzinfo=None)})
        conn.execute(text("INSERT INTO reauth (grant_id, reason, since) "
                          "VALUES (7, 'other', :t)"), {"t": NOW.replace(tzinfo=None)})
    db.upgrade(engine)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT seq FROM reauth")).scalar_one() == 7
        assert conn.execute(text("SELECT value FROM counters WHERE name = 'reauth'")
                            ).scalar_one() == 7
        assert list(take_seqs(conn, "reauth", 1)) == [8]
    engine.dispose()


def test_a_grant_refreshed_since_it_was_read_is_not_leased_for_a_second_refresh(
    store: Store,
) -> None:
    put(store, grant("o-fresh", access_expires_at=NOW + timedelta(hours=2)))
    lease = {"lease_id": "L9", "lease_s": 300, "now": NOW}
    assert store.claim_one("wx1", "o-fresh", expiring_by=NOW + timedelta(hours=1),
                           **lease) is None  # type: ignore[arg-type]
    assert store.claim_one("wx1", "o-fresh", expiring_by=NOW + timedelta(hours=3),
                           **lease) is not None  # type: ignore[arg-type]
