"""The sweep in process, on both databases, against the simulator over loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from keeper.config import build_config
from keeper.core.models import ACTIVE, REAUTH, Grant
from keeper.core.policy import schedule
from keeper.crypto import create_key_file
from keeper.limiter import QuotaGate
from keeper.service.runtime import Runtime
from keeper.store.rows import GrantWrite
from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, SECRET, pass_lease_time, wait_for
from tests.e2e.helpers import make_grant
from tests.store.test_grants import told


def key_file(directory: Path) -> Path:
    path = directory / "test.key"
    if not path.exists():
        create_key_file(path)
    return path


def build_runtime(url: str, sim: Simulator, tmp_path: Path, **settings: object) -> Runtime:
    config = build_config(
        {"database_url": url, "api_base": sim.url, "workers": 4,
         "encryption_key_file": str(key_file(tmp_path)), "read_timeout": 0.5,
         "connect_timeout": 0.5, "lease": "1m", "apps": [{"appid": APPID, "secret_env": "S"}],
         **settings},
        env={"S": SECRET}, source="test",
    )
    return Runtime.build(config)


@pytest.fixture
def rt(migrated_url: str, sim: Simulator, tmp_path: Path) -> Iterator[Runtime]:
    runtime = build_runtime(migrated_url, sim, tmp_path)
    yield runtime
    runtime.close()


def put(rt: Runtime, sim: Simulator, *grants: dict[str, object]) -> None:
    """Known to WeChat (the simulator) and stored in keeper."""
    sim.add_grants(list(grants))
    app = rt.config.apps[0]
    writes = []
    for g in grants:
        grant = Grant(
            id=0, appid=APPID, openid=str(g["openid"]), unionid=None, scope=str(g["scope"]),
            access_token=str(g["access_token"]), refresh_token=str(g["refresh_token"]),
            access_expires_at=datetime.fromtimestamp(float(g["access_expires_at"]), UTC),  # type: ignore[arg-type]
            refresh_issued_at=datetime.fromtimestamp(float(g["refresh_issued_at"]), UTC),  # type: ignore[arg-type]
            state=ACTIVE,
        )
        writes.append(GrantWrite(grant, schedule(grant, rt.config.lifetime(app))))
    rt.store.upsert_grants(writes, datetime.now(UTC))


def sweep(rt: Runtime) -> dict[str, object]:
    sweeper = rt.sweeper()
    try:
        return sweeper.run_once()
    finally:
        sweeper.close()


def test_a_stale_access_token_is_refreshed_and_the_profile_read_once_more(
    rt: Runtime, sim: Simulator
) -> None:
    put(rt, sim, make_grant("o1"))
    sim.force("userinfo", 42001)
    summary = sweep(rt)
    assert summary["access_tokens_refreshed"] == 1 and summary["profiles_fetched"] == 1
    assert summary["stale_access_tokens"] == 1 and summary["reauth_recorded"] == 0
    assert sim.stats()["endpoints"]["userinfo"]["calls"] == 2  # type: ignore[index]


def test_snapshot_users_and_48001_stop_profile_reads_for_good(
    rt: Runtime, sim: Simulator
) -> None:
    put(rt, sim, make_grant("snap", state="snapshot"), make_grant("o2"))
    sim.force("userinfo", 50001, openid="o2")
    first = sweep(rt)
    assert first["no_profile"] == 2
    snap = rt.store.get_grant(APPID, "snap")
    assert snap is not None and snap.profile_stop == 48001
    o2 = rt.store.get_grant(APPID, "o2")
    assert o2 is not None and o2.profile_stop is None  # 50001 may change: asked again later
    profile = rt.store.profile(o2.id)
    assert profile is not None and profile["errcode"] == 50001


def test_a_rotated_refresh_token_restarts_the_clock(rt: Runtime, sim: Simulator) -> None:
    sim.configure(rotate_refresh_tokens=True)
    put(rt, sim, make_grant("o1", issued_days_ago=29.2, scope="snsapi_base"))
    summary = sweep(rt)
    assert summary["refresh_tokens_renewed"] == 1 and summary["reauth_recorded"] == 0
    g = rt.store.get_grant(APPID, "o1")
    assert g is not None and g.refresh_token != "RT-o1-e2e-secret"
    assert datetime.now(UTC) - g.refresh_issued_at < timedelta(minutes=1)
    assert list(rt.store.iter_reauth()) == []


def test_wechat_refusing_the_app_is_one_error_per_sweep_and_touches_no_user(
    rt: Runtime, sim: Simulator
) -> None:
    put(rt, sim, *(make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base") for i in range(6)))
    sim.force("refresh", 40164, count=100)
    with capture_logs() as logs:
        summary = sweep(rt)
    errors = [e for e in logs if e["event"] == "wechat.app_rejected"]
    assert len(errors) == 1 and errors[0]["errcode"] == 40164
    assert summary["apps_rejected"] == [APPID] and summary["reauth_recorded"] == 0
    assert rt.store.status(datetime.now(UTC))["active"] == 6


def test_a_daily_quota_answer_defers_the_app_until_midnight_in_china(
    rt: Runtime, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(rt, sim, *(make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                   for i in range(20)))
    sim.force("refresh", 45009)
    paused: list[float] = []
    pause = QuotaGate.pause

    def pause_and_note(gate: QuotaGate, *args: Any, **kwargs: Any) -> datetime:
        until = pause(gate, *args, **kwargs)
        paused.append(time.time())  # the simulator's arrivals are time.time() too
        return until

    monkeypatch.setattr(QuotaGate, "pause", pause_and_note)
    with capture_logs() as logs:
        summary = sweep(rt)
    assert summary["reauth_recorded"] == 0 and summary["transient_failures"] == 1
    assert any(e["event"] == "quota.paused" and e["errcode"] == 45009 for e in logs)
    # Once the gate is paused, only the calls whose permits were taken before could still
    # reach WeChat: one per other worker at most. The rest wait for midnight, in this process
    # and (through the database) in every other. (How many calls were made before the pause
    # depends on how soon the answer's thread ran: not asserted.)
    assert len(paused) == 1
    arrivals = sim.stats(detail=True)["arrivals"]["refresh"]  # type: ignore[index]
    assert len([t for t in arrivals if t > paused[0]]) <= rt.config.workers - 1
    calls = sim.stats()["endpoints"]["refresh"]["calls"]  # type: ignore[index]
    again = sweep(rt)
    assert again["access_tokens_refreshed"] == 0
    assert sim.stats()["endpoints"]["refresh"]["calls"] == calls  # type: ignore[index]


def test_stopping_a_sweep_finishes_calls_in_flight_and_releases_every_lease(
    rt: Runtime, sim: Simulator
) -> None:
    put(rt, sim, *(make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                   for i in range(40)))
    sim.configure(latency_s=0.1)
    sweeper = rt.sweeper()
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(sweeper.run_once()))
    thread.start()
    deadline = time.monotonic() + 10
    while sim.stats()["endpoints"]["refresh"]["ok"] < 4:  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    rt.stop.set()
    thread.join(timeout=10)
    sweeper.close()
    assert result["stopped"] is True
    done = result["access_tokens_refreshed"]
    assert isinstance(done, int) and 4 <= done < 40
    assert sim.stats()["endpoints"]["refresh"]["ok"] == done  # type: ignore[index]
    leased = [g for i in range(40) if (g := rt.store.get_grant(APPID, f"o{i}")) and g.lease_id]
    assert leased == []


def test_profile_interval_zero_reads_profiles_on_every_sweep(
    migrated_url: str, sim: Simulator, tmp_path: Path
) -> None:
    config = build_config(
        {"database_url": migrated_url, "api_base": sim.url, "profile_interval": 0,
         "encryption_key_file": str(key_file(tmp_path)),
         "apps": [{"appid": APPID}]}, env={}, source="test")
    runtime = Runtime.build(config)
    try:
        put(runtime, sim, make_grant("o1"))
        assert sweep(runtime)["profiles_fetched"] == 1
        assert sweep(runtime)["profiles_fetched"] == 1
    finally:
        runtime.close()


def test_a_result_the_database_refuses_costs_its_batch_mates_nothing(
    rt: Runtime, sim: Simulator
) -> None:
    """Given two held results in one batch, one whose profile no database can store (a lone
    surrogate that got past the cleaning), when the sweeper writes them, both grants' tokens
    are stored and only that profile is dropped."""
    from dataclasses import replace as _replace

    from keeper.core.models import Profile
    from keeper.store.rows import new_lease_id
    from keeper.sweep.engine import Held

    put(rt, sim, make_grant("ok-user"), make_grant("odd-user"))
    lease = new_lease_id()
    now = datetime.now(UTC)
    claimed = rt.store.claim(appids=[APPID], cutoff=now + timedelta(days=400), limit=10,
                             lease_id=lease, lease_s=300, now=now)
    sweeper = rt.sweeper()
    app = rt.config.apps[0]
    for g in claimed:
        new = _replace(g, refresh_token=f"RT-{g.openid}-new", refresh_issued_at=now)
        profile = Profile(now, nickname="cut\ud83d" if g.openid == "odd-user" else "n")
        sweeper.held[g.id] = Held(GrantWrite(new, schedule(new, rt.config.lifetime(app)),
                                             profile, base=(g.access_token, g.refresh_token)),
                                  lease)
    with capture_logs() as logs:
        written, superseded = sweeper.write_held()
    assert (written, superseded) == (2, 0) and not sweeper.held
    assert "result.unwritable" not in [e["event"] for e in logs]
    for openid in ("ok-user", "odd-user"):
        stored = rt.store.get_grant(APPID, openid)
        assert stored is not None and stored.refresh_token == f"RT-{openid}-new"
    odd = rt.store.get_grant(APPID, "odd-user")
    ok = rt.store.get_grant(APPID, "ok-user")
    assert odd is not None and ok is not None
    assert rt.store.profile(odd.id) is None and rt.store.profile(ok.id) is not None


def refresh_errors(sim: Simulator) -> dict[str, int]:
    return dict(sim.stats()["endpoints"]["refresh"]["errors"])  # type: ignore[index]


def test_a_frozen_holders_new_tokens_win_over_the_40030_a_takeover_hears(
    rt: Runtime, sim: Simulator
) -> None:
    """Given WeChat rotates refresh tokens and process A refreshed a grant, then froze past
    its lease before writing, when a sweep takes the grant over it sends the replaced token
    and WeChat answers 40030: the answer is held, and no record, event or feed row names the
    user. When A wakes up and writes WeChat's new tokens, the grant is alive, and nobody was
    ever told otherwise."""
    sim.configure(rotate_refresh_tokens=True)
    put(rt, sim, make_grant("o1", access_in_s=-60, scope="snsapi_base"))
    now = datetime.now(UTC)
    [a] = rt.store.claim(appids=[APPID], cutoff=now, limit=1, lease_id="A", lease_s=60, now=now)
    frozen = rt.worker.work(a)  # WeChat rotated the tokens; A froze before its write
    assert frozen.write is not None
    assert frozen.write.grant.refresh_token == sim.current_tokens()["o1"][1]
    pass_lease_time(rt.store, 61)
    summary = sweep(rt)
    assert refresh_errors(sim) == {"40030": 1}
    assert told(rt.store) == []
    assert summary["reauth_recorded"] == 0 and summary.get("reauth_held") == 1
    assert rt.store.apply([frozen.write], "A", datetime.now(UTC)) == 1
    g = rt.store.get_grant(APPID, "o1")
    assert g is not None and g.state == ACTIVE
    assert g.refresh_token == sim.current_tokens()["o1"][1]
    assert told(rt.store) == []
    assert sweep(rt)["reauth_recorded"] == 0 and told(rt.store) == []


def test_a_grant_dead_for_real_is_recorded_when_its_hold_ends_without_a_second_call(
    rt: Runtime, sim: Simulator
) -> None:
    """Given a process died holding the lease of a grant WeChat has really killed, the sweep
    that takes it over holds WeChat's 40030; when the hold (one lease) is over and nobody
    wrote newer tokens, the next sweep records it without calling WeChat again: one record,
    one event, one feed row."""
    put(rt, sim, make_grant("o1", access_in_s=-60, scope="snsapi_base", state="invalid"))
    now = datetime.now(UTC)
    assert rt.store.claim(appids=[APPID], cutoff=now, limit=1, lease_id="A", lease_s=60,
                          now=now)
    pass_lease_time(rt.store, 61)
    first = sweep(rt)
    assert told(rt.store) == []
    assert first["reauth_recorded"] == 0 and first.get("reauth_held") == 1
    assert refresh_errors(sim) == {"40030": 1}
    lease_s = rt.config.lease_s
    assert sweep(rt)["reauth_recorded"] == 0  # the hold is not over
    pass_lease_time(rt.store, lease_s + 1)
    sweeper = rt.sweeper()
    try:
        summary = sweeper.run_once(datetime.now(UTC) + timedelta(seconds=lease_s + 1))
    finally:
        sweeper.close()
    assert summary["reauth_recorded"] == 1
    assert refresh_errors(sim) == {"40030": 1}  # no second call
    assert told(rt.store) == [("feed", "o1"), ("reauth.recorded", "o1")]
    g = rt.store.get_grant(APPID, "o1")
    assert g is not None and g.state == REAUTH
    assert sweep(rt)["reauth_recorded"] == 0
    assert told(rt.store) == [("feed", "o1"), ("reauth.recorded", "o1")]


def test_a_call_given_up_at_a_stop_keeps_its_lease_until_its_answer_is_written(
    migrated_url: str, sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given calls still in flight when a stop's grace ends, their leases are not given back
    (their answers may yet bring new tokens: a grant released now would be claimed as if
    nobody held it, and the 40030 for its replaced token recorded at once), while grants no
    worker started are released. The answers, when they come, are written under the lease."""
    from keeper.sweep import engine

    monkeypatch.setattr(engine, "STOP_GRACE_S", 0.05)
    sim.configure(rotate_refresh_tokens=True, latency_s=1.0)
    rt = build_runtime(migrated_url, sim, tmp_path, read_timeout=5)
    put(rt, sim, *(make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                   for i in range(12)))
    sweeper = rt.sweeper()
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(sweeper.run_once()))
    thread.start()
    deadline = time.monotonic() + 10
    while sim.stats()["endpoints"]["refresh"]["calls"] < 4:  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    rt.stop.set()
    thread.join(timeout=10)
    try:
        leased = [g.openid for i in range(12)
                  if (g := rt.store.get_grant(APPID, f"o{i}")) and g.lease_id]
        assert len(leased) == 4 and result["abandoned"] == 4  # the 4 workers' calls
        wait_for(lambda: sweeper.held_count() == 4)
        assert sweeper.write_held() == (4, 0)
        current = sim.current_tokens()
        for openid in leased:
            g = rt.store.get_grant(APPID, openid)
            assert g is not None and g.lease_id is None
            assert g.refresh_token == current[openid][1]
    finally:
        sweeper.close()
        rt.close()
    assert sim.stats()["endpoints"]["refresh"]["calls"] == 4  # type: ignore[index]
