"""The store on SQLite and PostgreSQL: what is due, leases, results, reports, quota state."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import func, inspect, select, text

from keeper.core.models import EXPIRING, REAUTH, Grant, Profile, Reauth
from keeper.core.policy import Lifetime, after_reauth, confirm_held, held_answer, schedule
from keeper.core.quota import Decision
from keeper.errors import DatabaseUnavailable, SchemaOutdated
from keeper.store import db
from keeper.store.grants import Store
from keeper.store.leases import _free
from keeper.store.rows import GrantWrite
from keeper.store.schema import events, grants
from tests.conftest import TEST_CIPHER, pass_lease_time, wait_for

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
CLOCK = Lifetime(30 * 86400, 29 * 86400, 300, 86400)
LEASE = NOW + timedelta(minutes=5)


def grant(openid: str, **kw: object) -> Grant:
    base = Grant(
        id=0, appid="wx1", openid=openid, unionid=None, scope="snsapi_base",
        access_token=f"AT-{openid}", refresh_token=f"RT-{openid}",
        access_expires_at=NOW + timedelta(hours=1), refresh_issued_at=NOW - 10 * DAY,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def put(store: Store, *grants: Grant) -> None:
    store.upsert_grants([GrantWrite(g, schedule(g, CLOCK)) for g in grants], NOW)


def claim(store: Store, limit: int = 100, lease_id: str = "L1") -> list[Grant]:
    return store.claim(appids=["wx1"], cutoff=NOW, limit=limit, lease_id=lease_id,
                       lease_s=300)


def test_migrations_create_every_table(db_url: str) -> None:
    engine = db.make_engine(db_url)
    before, after = db.upgrade(engine)
    assert before is None and after == db.head_revision(engine)
    assert {"grants", "profiles", "reauth", "sweeps", "quota_state"} <= set(
        inspect(engine).get_table_names()
    )
    assert db.upgrade(engine) == (after, after)  # idempotent
    engine.dispose()


#: ``profiles.sex`` as keeper stored it before migration 0009 (text), and as WeChat's integer
#: after it: 0 unknown, 1 male, 2 female; blank or NULL none; anything else WeChat's "unknown".
SEX_MIGRATED = {"0": 0, "1": 1, "2": 2, " 2 ": 2, "1.0": 1, "x": 0, "3": 0, "-1": 0, "": None,
                "  ": None, None: None}


def test_migration_0009_makes_sex_wechats_integer(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, target="0008")
    t = NOW.replace(tzinfo=None)
    with engine.begin() as conn:
        for gid, sex in enumerate(SEX_MIGRATED, 1):
            conn.execute(text(
                "INSERT INTO grants (id, appid, openid, scope, access_token, refresh_token, "
                "access_expires_at, refresh_issued_at, state, failures, created_at, "
                "updated_at) VALUES (:id, 'wx1', :o, 's', 'a', 'r', :t, :t, 'active', 0, :t, :t)"),
                {"id": gid, "o": f"o{gid}", "t": t})
            conn.execute(text("INSERT INTO profiles (grant_id, nickname, sex, fetched_at, "
                              "avatar_due) VALUES (:id, 'n', :sex, :t, false)"),
                         {"id": gid, "sex": sex, "t": t})
    db.upgrade(engine)
    [column] = [c for c in inspect(engine).get_columns("profiles") if c["name"] == "sex"]
    assert column["type"].python_type is int
    with engine.connect() as conn:
        got = dict(conn.execute(text("SELECT grant_id, sex FROM profiles")).all())
        nicknames = set(conn.execute(text("SELECT nickname FROM profiles")).scalars())
    assert {sex: got[gid] for gid, sex in enumerate(SEX_MIGRATED, 1)} == SEX_MIGRATED
    assert all(v is None or type(v) is int for v in got.values())
    assert nicknames == {"n"}  # the rest of each row as it was
    # Back to text (0008), then forward again: the integers come through.
    cfg = db._alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0008")
    with engine.connect() as conn:
        assert dict(conn.execute(text("SELECT grant_id, sex FROM profiles")).all()) == {
            gid: None if v is None else str(v) for gid, v in got.items()}
    db.upgrade(engine)
    with engine.connect() as conn:
        assert dict(conn.execute(text("SELECT grant_id, sex FROM profiles")).all()) == got
    engine.dispose()
    store = Store(db_url, cipher=TEST_CIPHER).open()
    assert (store.profile(2) or {})["sex"] == 1  # grant 2 stored "1"
    store.close()


@pytest.mark.db
def test_postgres_is_not_migrated_behind_the_operators_back() -> None:
    from tests.conftest import TEST_CIPHER, require_postgres, reset_postgres

    url = require_postgres()
    reset_postgres()
    with pytest.raises(SchemaOutdated, match="keeper db upgrade"):
        Store(url, cipher=TEST_CIPHER).open()


@pytest.mark.db
def test_an_unreachable_database_is_one_clear_error() -> None:
    from tests.conftest import TEST_CIPHER

    s = Store("postgresql+psycopg://keeper:pw-not-shown@127.0.0.1:1/keeper", cipher=TEST_CIPHER)
    with pytest.raises(DatabaseUnavailable) as e:
        s.open()
    assert "pw-not-shown" not in str(e.value) and "\n" not in str(e.value)


def test_the_due_query_puts_refresh_days_first_then_access_then_profiles(store: Store) -> None:
    put(store,
        grant("fresh"),
        grant("access-late", access_expires_at=NOW - timedelta(hours=1)),
        grant("access-early", access_expires_at=NOW - timedelta(hours=9)),
        grant("day29", refresh_issued_at=NOW - 29 * DAY),
        grant("day29.5", refresh_issued_at=NOW - 29 * DAY - timedelta(hours=12)),
        grant("profile", scope="snsapi_userinfo"))
    got = [g.openid for g in claim(store)]
    assert got == ["day29.5", "day29", "access-early", "access-late", "profile"]


def test_claims_are_paged_and_never_overlap(store: Store) -> None:
    put(store, *(grant(f"o{i}", access_expires_at=NOW - timedelta(minutes=i)) for i in range(50)))
    first = claim(store, limit=20, lease_id="A")
    second = claim(store, limit=100, lease_id="B")
    assert len(first) == 20 and len(second) == 30
    assert not {g.id for g in first} & {g.id for g in second}
    assert claim(store, lease_id="C") == []


def test_concurrent_claimers_never_get_the_same_grant(store: Store) -> None:
    put(store, *(grant(f"o{i}", access_expires_at=NOW - DAY) for i in range(200)))
    results: dict[str, list[int]] = {}

    def worker(name: str) -> None:
        got: list[int] = []
        while batch := store.claim(appids=["wx1"], cutoff=NOW, limit=7, lease_id=name,
                                   lease_s=300):
            got.extend(g.id for g in batch)
        results[name] = got

    threads = [threading.Thread(target=worker, args=(f"W{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for got in results.values() for i in got]
    assert len(ids) == 200 and len(set(ids)) == 200


def test_a_lapsed_lease_makes_the_grant_due_again(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY))
    [g] = claim(store, lease_id="A")
    pass_lease_time(store, 301)
    again = store.claim(appids=["wx1"], cutoff=NOW, limit=10, lease_id="B", lease_s=300)
    assert [x.id for x in again] == [g.id]
    # The first holder's late write is refused: the lease is no longer theirs.
    assert store.apply([GrantWrite(g, schedule(g, CLOCK))], "A", NOW) == 0


def test_results_are_written_and_the_lease_ends(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY, scope="snsapi_userinfo"))
    [g] = claim(store)
    new = replace(g, access_token="AT-new", access_expires_at=NOW + timedelta(hours=2),
                  profile_at=NOW)
    profile = Profile(NOW, nickname="Nick", sex=1, headimgurl="http://x/0",
                      privilege=("chinaunicom",), unionid="u1")
    assert store.apply([GrantWrite(new, schedule(new, CLOCK), profile)], "L1", NOW) == 1
    stored = store.get_grant("wx1", "o1")
    assert stored is not None and stored.access_token == "AT-new" and stored.lease_id is None
    assert claim(store) == []
    p = store.profile(g.id)
    assert p is not None and p["nickname"] == "Nick" and p["privilege"] == ["chinaunicom"]


def test_a_no_profile_answer_keeps_the_last_profile(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY))
    [g] = claim(store)
    store.apply([GrantWrite(g, schedule(g, CLOCK), Profile(NOW, nickname="Nick"))], "L1", NOW)
    [g] = store.claim(appids=["wx1"], cutoff=NOW, limit=1, lease_id="L2", lease_s=300) or [
        store.claim_one("wx1", "o1", lease_id="L2", lease_s=300, now=NOW)]
    assert g is not None
    store.apply([GrantWrite(g, schedule(g, CLOCK), Profile(NOW, errcode=50001))], "L2", NOW)
    p = store.profile(g.id)
    assert p is not None and p["nickname"] == "Nick" and p["errcode"] == 50001


def test_reauth_records_are_listed_and_a_new_grant_clears_them(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY), grant("o2", access_expires_at=NOW - DAY))
    writes = []
    for g in claim(store):
        dead, record = after_reauth(g, 42002, NOW)
        writes.append(GrantWrite(dead, schedule(dead, CLOCK), reauth=record))
    store.apply(writes, "L1", NOW)
    listed = list(store.iter_reauth(batch=1))
    assert [(r["openid"], r["reason"], r["errcode"]) for r in listed] == [
        ("o1", "refresh_token_expired", 42002), ("o2", "refresh_token_expired", 42002)]
    assert store.status(NOW)["reauth_required"] == 2
    assert claim(store) == []  # dead grants are never due
    put(store, grant("o1", access_token="AT-again"))
    assert [r["openid"] for r in store.iter_reauth()] == ["o2"]
    revived = store.get_grant("wx1", "o1")
    assert revived is not None and revived.state == "active"


def test_an_import_wins_over_a_sweep_holding_the_old_tokens(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY))
    [g] = claim(store)
    put(store, grant("o1", refresh_token="RT-from-import"))
    assert store.apply([GrantWrite(g, schedule(g, CLOCK))], "L1", NOW) == 0
    stored = store.get_grant("wx1", "o1")
    assert stored is not None and stored.refresh_token == "RT-from-import"


def refreshed(g: Grant, token: str) -> GrantWrite:
    """A refresh answered with a rotated refresh token, as the worker would write it."""
    new = replace(g, access_token=f"AT-{token}", refresh_token=f"RT-{token}",
                  refresh_issued_at=NOW)
    return GrantWrite(new, schedule(new, CLOCK), base=(g.access_token, g.refresh_token))


def refused(g: Grant, errcode: int, when: datetime = NOW) -> GrantWrite:
    """WeChat refused ``g``'s tokens, as the worker writes it: a 40030 or 42002 about the
    tokens the work started from may be held (``hold_s``, one lease of 300 s)."""
    dead, record = after_reauth(g, errcode, when)
    return GrantWrite(dead, schedule(dead, CLOCK), reauth=record,
                      base=(g.access_token, g.refresh_token),
                      hold_s=300 if held_answer(errcode) else None)


def told(store: Store) -> list[tuple[str, object]]:
    """Everything an application can read about re-authorizations: the feed's rows and the
    reauth events of the outbox, as (what, openid)."""
    rows, _ = store.reauth_page(0, 1000)
    with store.engine.connect() as conn:
        news = conn.execute(select(events.c.type, events.c.openid)
                            .where(events.c.type.like("reauth.%")).order_by(events.c.seq)).all()
    return [("feed", r["openid"]) for r in rows] + [(t, o) for t, o in news]


def test_a_takeovers_40030_names_nobody_while_the_frozen_holder_may_write_its_new_tokens(
    store: Store,
) -> None:
    """Given A claimed a grant and WeChat rotated its tokens for A, when A freezes past its
    lease and B takes the grant over, B's refresh with the replaced token is answered 40030:
    nothing is recorded, announced or listed, the tokens stay, and no claim takes the grant
    while A may still write. When A wakes up and writes WeChat's new tokens, the grant is
    alive and nobody was ever told otherwise."""
    put(store, grant("o1", access_expires_at=NOW - DAY))
    [a] = claim(store, lease_id="A")
    assert not a.taken_over
    pass_lease_time(store, 301)  # A is frozen: its lease lapses unreleased
    [b] = claim(store, lease_id="B")
    assert b.taken_over
    assert store.apply([refused(b, 40030)], "B", NOW) == 1
    assert told(store) == []
    held = store.get_grant("wx1", "o1")
    assert held is not None and held.state == "active" and held.refresh_token == "RT-o1"
    assert (held.held_errcode, held.held_since, held.lease_id) == (40030, NOW, None)
    status = store.status(NOW)
    assert status["reauth_required"] == 0 and status["reauth_held"] == 1
    # Held for A: neither a sweep (whatever its cutoff) nor a one-user command takes it.
    assert store.claim(appids=["wx1"], cutoff=NOW + DAY, limit=10, lease_id="C", lease_s=300,
                       now=NOW) == []
    assert store.claim_one("wx1", "o1", lease_id="D", lease_s=300, now=NOW) is None

    assert store.apply([refreshed(a, "new")], "A", NOW) == 1
    alive = store.get_grant("wx1", "o1")
    assert alive is not None and alive.refresh_token == "RT-new" and alive.state == "active"
    assert alive.held_errcode is None and store.status(NOW)["reauth_held"] == 0
    assert told(store) == []


def test_a_held_answer_nobody_disproves_is_recorded_once_when_its_hold_ends(
    store: Store,
) -> None:
    """Given B's 40030 after a takeover is held, when the hold (one more lease) ends and A
    never wrote, the next claim finds the answer still held and confirms it without asking
    WeChat again: the record, its event and its feed row appear together, exactly once."""
    put(store, grant("o1", access_expires_at=NOW - DAY))
    claim(store, lease_id="A")  # A dies holding the lease
    pass_lease_time(store, 301)
    [b] = claim(store, lease_id="B")
    assert store.apply([refused(b, 40030)], "B", NOW) == 1
    pass_lease_time(store, 299)
    later = NOW + timedelta(seconds=301)
    # Due by the process's clock (the cutoff), but the hold is not over on the database's.
    assert store.claim(appids=["wx1"], cutoff=later, limit=10, lease_id="C", lease_s=300,
                       now=NOW) == []
    pass_lease_time(store, 2)
    [c] = store.claim(appids=["wx1"], cutoff=later, limit=10, lease_id="C", lease_s=300,
                      now=NOW)
    assert (c.held_errcode, c.held_since, c.taken_over) == (40030, NOW, False)
    dead, record = confirm_held(c)
    assert record == Reauth("refresh_token_invalid", 40030, NOW)
    assert store.apply([GrantWrite(dead, schedule(dead, CLOCK), reauth=record,
                                   base=(c.access_token, c.refresh_token))], "C", later) == 1
    assert told(store) == [("feed", "o1"), ("reauth.recorded", "o1")]
    status = store.status(later)
    assert status["reauth_required"] == 1 and status["reauth_held"] == 0
    assert store.claim(appids=["wx1"], cutoff=later + DAY, limit=10, lease_id="E",
                       lease_s=300, now=NOW) == []


def test_a_40030_whose_own_lease_was_lost_is_held_while_another_holder_works(
    store: Store,
) -> None:
    """Given A's lease lapsed before A's call reached WeChat and B took the grant over and
    had its refresh rotated, A's 40030 (B had replaced the token) arrives while B still
    works: it is held, not recorded, and B's write of the new tokens settles it."""
    put(store, grant("o1", access_expires_at=NOW - DAY))
    [a] = claim(store, lease_id="A")
    pass_lease_time(store, 301)
    [b] = claim(store, lease_id="B")
    assert store.apply([refused(a, 40030)], "A", NOW) == 1
    assert told(store) == []
    held = store.get_grant("wx1", "o1")
    assert held is not None and held.held_errcode == 40030 and held.state == "active"
    # While held, another doubtful answer or a result with no new refresh token (a failure,
    # the same token back on its refresh day) changes nothing.
    assert store.apply([refused(a, 42002)], "A", NOW) == 0
    same = replace(a, state=EXPIRING, access_token="AT-same-RT")
    for w in (GrantWrite(a, schedule(a, CLOCK), base=(a.access_token, a.refresh_token)),
              GrantWrite(same, schedule(same, CLOCK), reauth=Reauth(
                  "refresh_token_expiring", None, NOW), base=(a.access_token, a.refresh_token))):
        assert store.apply([w], "A", NOW) == 0
    assert store.apply([refreshed(b, "by-B")], "B", NOW) == 1
    alive = store.get_grant("wx1", "o1")
    assert alive is not None and alive.refresh_token == "RT-by-B" and alive.held_errcode is None
    assert told(store) == []


def test_answers_no_other_holder_can_explain_are_recorded_at_once(store: Store) -> None:
    """Without a takeover a 40030 is recorded at once, and 42007 (every token of the
    authorization is dead, the newest too) is recorded at once even after a takeover."""
    put(store, grant("o1", access_expires_at=NOW - DAY), grant("o2", access_expires_at=NOW - DAY))
    [g1] = [g for g in claim(store, lease_id="A") if g.openid == "o1"]
    assert store.apply([refused(g1, 40030)], "A", NOW) == 1
    pass_lease_time(store, 301)
    [g2] = claim(store, lease_id="B")
    assert g2.openid == "o2" and g2.taken_over
    assert store.apply([refused(g2, 42007)], "B", NOW) == 1
    assert told(store) == [("feed", "o1"), ("feed", "o2"), ("reauth.recorded", "o1"),
                           ("reauth.recorded", "o2")]


def test_a_result_whose_lease_lapsed_is_written_while_the_stored_tokens_are_its_base(
    store: Store,
) -> None:
    """Given A's lease lapsed during an outage and B holds the grant now, when A's held
    result arrives and the stored tokens are still the ones A refreshed, it is written (it is
    the newest answer) and the failure B had from the same old tokens is settled."""
    put(store, grant("o1", access_expires_at=NOW - DAY))
    [g] = claim(store, lease_id="A")
    pass_lease_time(store, 301)
    later = LEASE + timedelta(seconds=1)
    [b] = store.claim(appids=["wx1"], cutoff=later, limit=1, lease_id="B", lease_s=300,
                      now=NOW)
    # B sent the old token WeChat had replaced
    assert store.apply([refused(b, 40030, later)], "B", later) == 1
    assert store.apply([refreshed(g, "new")], "A", later) == 1
    stored = store.get_grant("wx1", "o1")
    assert stored is not None and stored.refresh_token == "RT-new" and stored.state == "active"
    assert store.reauth_record(g.id) is None and stored.lease_id is None


def test_an_older_result_never_overwrites_a_newer_token(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY))
    [g] = claim(store, lease_id="A")
    pass_lease_time(store, 301)
    later = LEASE + timedelta(seconds=1)
    [b] = store.claim(appids=["wx1"], cutoff=later, limit=1, lease_id="B", lease_s=300,
                      now=NOW)
    assert store.apply([refreshed(b, "by-B")], "B", later) == 1
    # A's result was made from the tokens B has replaced since: superseded.
    assert store.apply([refreshed(g, "by-A")], "A", later) == 0
    stored = store.get_grant("wx1", "o1")
    assert stored is not None and stored.refresh_token == "RT-by-B"


def test_claims_skip_grants_whose_results_this_process_still_holds(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY), grant("o2", access_expires_at=NOW - DAY))
    first = store.get_grant("wx1", "o1")
    assert first is not None
    got = store.claim(appids=["wx1"], cutoff=NOW, limit=10, lease_id="L", lease_s=300,
                      exclude={first.id})
    assert [g.openid for g in got] == ["o2"]


def test_released_grants_are_due_again_at_their_own_time(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY))
    [g] = claim(store)
    assert store.release([g.id], "L1") == 1
    assert [x.openid for x in claim(store, lease_id="L2")] == ["o1"]


def test_claim_one_refuses_a_grant_another_process_holds(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW - DAY))
    claim(store)
    assert store.claim_one("wx1", "o1", lease_id="X", lease_s=300, now=NOW) is None
    pass_lease_time(store, 299)
    assert store.claim_one("wx1", "o1", lease_id="X", lease_s=300, now=NOW) is None
    pass_lease_time(store, 2)
    assert store.claim_one("wx1", "o1", lease_id="X", lease_s=300, now=NOW) is not None


def test_status_counts(store: Store) -> None:
    put(store, grant("fresh"), grant("expired-access", access_expires_at=NOW - DAY),
        grant("due-soon", refresh_issued_at=NOW - 28 * DAY - timedelta(hours=1)))
    [g] = store.claim(appids=["wx1"], cutoff=NOW, limit=1, lease_id="L", lease_s=300)
    dead, record = after_reauth(g, 40030, NOW)
    store.apply([GrantWrite(dead, schedule(dead, CLOCK), reauth=record)], "L", NOW)
    s = store.status(NOW)
    assert s["grants"] == 3 and s["active"] == 2 and s["reauth_required"] == 1
    assert s["reauth_by_reason"] == {"refresh_token_invalid": 1}
    assert s["refresh_due_24h"] == 1 and s["avatars_saved"] == 0


def test_expiring_users_are_listed_but_stay_active(store: Store) -> None:
    put(store, grant("o1", refresh_issued_at=NOW - 29 * DAY))
    [g] = claim(store)
    g2 = replace(g, state=EXPIRING)
    store.apply([GrantWrite(g2, schedule(g2, CLOCK),
                            reauth=Reauth("refresh_token_expiring", None, NOW))], "L1", NOW)
    assert [r["reason"] for r in store.iter_reauth()] == ["refresh_token_expiring"]
    s = store.status(NOW)
    assert s["active"] == 1 and s["reauth_required"] == 1
    stored = store.get_grant("wx1", "o1")
    assert stored is not None and stored.state == EXPIRING != REAUTH


def test_sweep_history_keeps_the_last_summary(store: Store) -> None:
    assert store.last_sweep() is None
    sid = store.start_sweep(NOW, host="h", pid=1)
    store.finish_sweep(sid, NOW + timedelta(seconds=3), {"refresh_tokens_refreshed": 4})
    last = store.last_sweep()
    assert last is not None and last["summary"] == {"refresh_tokens_refreshed": 4}


def test_quota_state_is_a_compare_and_swap(store: Store) -> None:
    assert store.quota_tat("wx1", "refresh") == 0
    assert store.quota_swap("wx1", "refresh", 0, 100)
    assert not store.quota_swap("wx1", "refresh", 0, 200)
    store.quota_hold("wx1", "refresh", 50)
    assert store.quota_tat("wx1", "refresh") == 100
    store.quota_hold("wx1", "refresh", 500)
    assert store.quota_tat("wx1", "refresh") == 500


def test_quota_is_taken_at_the_databases_clock_by_compare_and_swap(store: Store) -> None:
    """The GCRA's "now" is the database's (the real time, whatever a test passes elsewhere),
    read with the state; a state changed by another taker meanwhile is never overwritten
    (on PostgreSQL the state is locked while a take decides: see the next test)."""
    def grant_one(tat_us: int, now_us: int) -> Decision:
        return Decision(1, max(tat_us, now_us) + 10, 0.0)

    store.quota_tat("wx1", "refresh")  # the row exists from first use on
    before = time.time()
    taken = store.quota_take("wx1", "refresh", grant_one)
    assert taken is not None
    decision, now_us = taken
    assert before - 5 < now_us / 1e6 < time.time() + 5
    assert store.quota_tat("wx1", "refresh") == decision.new_tat_us == now_us + 10
    assert store.quota_take("wx1", "refresh", lambda t, n: Decision(0, t, 1.0)) is not None
    assert store.quota_tat("wx1", "refresh") == now_us + 10  # nothing granted, nothing changed

    if not store.sqlite:
        return

    def raced(tat_us: int, now_us: int) -> Decision:
        assert store.quota_swap("wx1", "refresh", tat_us, tat_us + 1)  # another process
        return grant_one(tat_us, now_us)

    assert store.quota_take("wx1", "refresh", raced) is None
    assert store.quota_tat("wx1", "refresh") == now_us + 11


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_quota_take_on_postgres_waits_for_the_one_deciding_then_sees_its_state(
    store: Store,
) -> None:
    """Given a take deciding (its state row locked), when another taker (another process's,
    on a connection of its own) asks, then it waits until the first has committed and decides
    on the state the first left: no compare-and-swap is lost, none is asked again."""
    store.quota_tat("wx1", "refresh")
    seen: list[int] = []

    def second() -> None:
        def decide(tat_us: int, now_us: int) -> Decision:
            seen.append(tat_us)
            return Decision(1, max(tat_us, now_us) + 10, 0.0)
        assert store.quota_take("wx1", "refresh", decide) is not None

    other = threading.Thread(target=second)

    def first(tat_us: int, now_us: int) -> Decision:
        other.start()
        wait_for(lambda: _waiting_on_a_lock(store) == 1)  # the other take waits its turn
        return Decision(1, max(tat_us, now_us) + 10, 0.0)

    taken = store.quota_take("wx1", "refresh", first)
    other.join(timeout=10)
    assert taken is not None and seen == [taken[0].new_tat_us]
    assert store.quota_tat("wx1", "refresh") > taken[0].new_tat_us


def _waiting_on_a_lock(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar_one())


def test_the_due_query_is_a_range_scan_of_its_index(store: Store) -> None:
    put(store, *(grant(f"o{i}", access_expires_at=NOW + timedelta(minutes=i - 500))
                 for i in range(1000)))
    store.analyze()  # as `keeper import` does after a large import; autovacuum does it too
    db_clock = NOW if store.sqlite else func.clock_timestamp()  # as claims ask (store.clock)
    for column in ("refresh_due_at", "access_due_at", "profile_due_at"):
        col = grants.c[column]
        query = (select(grants.c.id)
                 .where(grants.c.appid == "wx1", col <= NOW, _free(db_clock))
                 .order_by(col).limit(10))
        sql = str(query.compile(store.engine, compile_kwargs={"literal_binds": True}))
        with store.engine.connect() as conn:
            plan = " ".join(str(r) for r in conn.execute(
                text(("EXPLAIN QUERY PLAN " if store.sqlite else "EXPLAIN ") + sql)))
        assert f"ix_grants_{column}" in plan, plan


def test_migration_0008_adds_takeovers_and_held_answers_and_can_be_undone(db_url: str) -> None:
    """Existing grants were taken over by nobody and hold no answer; a lease that lapsed
    before the upgrade still makes the next claim a takeover; the downgrade drops the
    columns and the upgrade after it brings them back. Neither touches the rows that
    reference grants (a table copy on SQLite would delete them by cascade)."""
    from alembic import command

    engine = db.make_engine(db_url)
    db.upgrade(engine, target="0007")
    long_ago = datetime(2000, 1, 1)  # a lapsed lease on any database's clock
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO grants (id, appid, openid, scope, access_token, refresh_token, "
            "access_expires_at, refresh_issued_at, state, failures, created_at, updated_at, "
            "access_due_at, lease_id, lease_until) VALUES (7, 'wx1', 'o7', 'snsapi_base', "
            ":at, :rt, :t, :t, 'active', 0, :t, :t, :t, 'L-before', :ago)"),
            {"at": TEST_CIPHER.encrypt("AT-o7"), "rt": TEST_CIPHER.encrypt("RT-o7"),
             "t": NOW.replace(tzinfo=None), "ago": long_ago})
        conn.execute(text(
            "INSERT INTO grants (id, appid, openid, scope, access_token, refresh_token, "
            "access_expires_at, refresh_issued_at, state, failures, created_at, updated_at) "
            "VALUES (8, 'wx1', 'o8', 'snsapi_base', :at, :rt, :t, :t, 'reauth', 0, :t, :t)"),
            {"at": TEST_CIPHER.encrypt("AT-o8"), "rt": TEST_CIPHER.encrypt("RT-o8"),
             "t": NOW.replace(tzinfo=None)})
        conn.execute(text("INSERT INTO reauth (grant_id, reason, since, seq, appid) "
                          "VALUES (8, 'other', :t, 1, 'wx1')"), {"t": NOW.replace(tzinfo=None)})
        conn.execute(text("INSERT INTO profiles (grant_id, fetched_at, avatar_due) "
                          "VALUES (8, :t, false)"), {"t": NOW.replace(tzinfo=None)})

    def kept() -> tuple[int, int]:
        with engine.connect() as conn:
            return (conn.execute(text("SELECT count(*) FROM reauth")).scalar_one(),
                    conn.execute(text("SELECT count(*) FROM profiles")).scalar_one())

    assert db.upgrade(engine, target="0008") == ("0007", "0008")
    assert kept() == (1, 1)
    db.upgrade(engine)  # the migrations after it, so that the store opens
    store = Store(db_url, cipher=TEST_CIPHER).open()
    try:
        before = store.get_grant("wx1", "o7")
        assert before is not None and not before.taken_over and before.held_errcode is None
        [g] = claim(store, lease_id="L-after")
        assert g.taken_over and g.held_since is None
    finally:
        store.close()
    cfg = db._alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")
    columns = {c["name"] for c in inspect(engine).get_columns("grants")}
    assert not columns & {"taken_over", "held_errcode", "held_since", "held_until"}
    assert kept() == (1, 1)
    assert db.upgrade(engine, target="0008") == ("0007", "0008")
    engine.dispose()
