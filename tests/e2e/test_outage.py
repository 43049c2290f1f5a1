"""Nothing WeChat answered is lost to a database outage, and the database never hangs keeper.

Refresh tokens rotate here (each refresh answers a new one and invalidates the old), so a
result that is received and not stored shows up at once: the next refresh sends the old token
and WeChat answers 40030, a false "must re-authorize". Faults are real: a storm of
``pg_terminate_backend``, SQLite's write lock held by another connection, SIGTERM and SIGKILL,
and a partition made with a blackhole route.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from structlog.testing import capture_logs

from keeper.config import build_config
from keeper.errors import DatabaseUnavailable
from keeper.service.runtime import Runtime
from keeper.store.grants import Store
from keeper.wechat.simulator import Simulator
from tests.conftest import (
    APPID,
    SECRET,
    TEST_CIPHER,
    Keeper,
    config_text,
    require_postgres,
    reset_postgres,
    wait_for,
)
from tests.e2e.helpers import make_grant, seed
from tests.e2e.outage import Outage, require_blackhole, silent_proxy
from tests.service.test_service import start_service, stop
from tests.sweep.test_engine import key_file, put

USERS = 120
#: The outage of the in-process test; KEEPER_OUTAGE_S=60 makes it a minute long.
OUTAGE_S = float(os.environ.get("KEEPER_OUTAGE_S", "3"))


def due_grants(n: int = USERS, scope: str = "snsapi_userinfo") -> list[dict[str, object]]:
    """Users on their refresh day: each sweep refreshes every one (and reads the profile)."""
    return [make_grant(f"u{i:04d}", issued_days_ago=29.5, scope=scope) for i in range(n)]


def refresh_calls(sim: Simulator) -> int:
    return int(sim.stats()["endpoints"]["refresh"]["calls"])  # type: ignore[index]


def lost_tokens(store: Store, sim: Simulator, openids: list[str]) -> list[str]:
    """Users whose stored refresh token is not the one WeChat holds now."""
    wechat = sim.current_tokens()
    lost = []
    for openid in openids:
        grant = store.get_grant(APPID, openid)
        assert grant is not None
        if grant.refresh_token != wechat[openid][1]:
            lost.append(openid)
    return lost


@pytest.fixture
def rotating_sim() -> Iterator[Simulator]:
    s = Simulator(rotate_refresh_tokens=True, latency_s=0.03, seed=11)
    s.add_app(APPID, SECRET)
    s.start()
    yield s
    s.stop()


def runtime(url: str, sim: Simulator, tmp_path: Path, *, workers: int = 8) -> Runtime:
    config = build_config(
        {"database_url": url, "api_base": sim.url, "workers": workers, "database_timeout": 1,
         "encryption_key_file": str(key_file(tmp_path)), "read_timeout": 2,
         "connect_timeout": 1, "lease": "1m", "journal_dir": str(tmp_path / "journal"),
         "apps": [{"appid": APPID, "secret_env": "S"}]},
        env={"S": SECRET}, source="test",
    )
    return Runtime.build(config)


def test_a_database_outage_mid_sweep_loses_no_rotated_token(
    migrated_url: str, rotating_sim: Simulator, tmp_path: Path
) -> None:
    """Given 120 users whose refresh tokens rotate, when the database refuses keeper for 3 s
    (KEEPER_OUTAGE_S) in the middle of a sweep, then the running process writes every result
    it held once the database is back: 0 users must re-authorize and every stored token is
    WeChat's."""
    sim = rotating_sim
    rt = runtime(migrated_url, sim, tmp_path)
    sweeper = rt.sweeper()
    try:
        grants = due_grants()
        put(rt, sim, *grants)
        outage = Outage(migrated_url, seconds=OUTAGE_S, when=lambda: refresh_calls(sim) >= 30)
        failed = 0
        with capture_logs() as logs:
            while not outage.done.is_set():
                try:
                    sweeper.run_once()
                except DatabaseUnavailable:
                    failed += 1
                time.sleep(0.1)  # the service backs off between attempts
        outage.wait()
        # Database trouble is operations, not a bug: no per-grant failure lines.
        events = {e["event"] for e in logs}
        assert not events & {"worker.failed", "avatar.failed", "result.unwritable"}, events
        assert failed >= 1, "the outage must hit a sweep"
        for _ in range(5):  # until nothing is due
            if sweeper.run_once()["refresh_tokens_refreshed"] == 0:
                break
        status = rt.store.status(datetime.now(UTC))
        lost = lost_tokens(rt.store, sim, [str(g["openid"]) for g in grants])
        errors = sim.stats()["endpoints"]["refresh"]["errors"]  # type: ignore[index]
    finally:
        sweeper.close()
        rt.close()
    print(f"outage hit {failed} sweep(s); lost {len(lost)}; reauth {status['reauth_required']}")
    assert status["reauth_required"] == 0
    assert lost == []
    assert "40030" not in errors


def _journal_files(keeper: Keeper) -> list[Path]:
    return sorted((keeper.workdir / "var" / "journal").glob("*.journal"))


def _prepare(keeper: Keeper, sim: Simulator, url: str) -> list[str]:
    sim.configure(rotate_refresh_tokens=True, latency_s=0.03)
    keeper.write_config(config_text(db_url=url, api_base=sim.url,
                                    extra="database_timeout = 1\nsweep_interval = 3600")
                        .replace("sweep_interval = 1\n", ""))
    if not url.startswith("sqlite"):
        assert keeper.run("db", "upgrade").code == 0
    grants = due_grants()
    seed(sim, keeper, grants)
    return [str(g["openid"]) for g in grants]


def _db_url(kind: str, keeper: Keeper) -> str:
    if kind == "sqlite":
        return f"sqlite:///{keeper.workdir / 'keeper.db'}"
    url = require_postgres()
    reset_postgres()
    return url


def _store_for(keeper: Keeper, url: str) -> Store:
    from keeper.crypto import Cipher, load_keys

    return Store(url, cipher=Cipher(load_keys([keeper.workdir / "keeper.key"])))


def _outcome(keeper: Keeper, url: str, sim: Simulator, openids: list[str]) -> tuple[list[str], int]:
    """(users whose stored refresh token is not WeChat's, re-authorization records)."""
    store = _store_for(keeper, url)
    try:
        return (lost_tokens(store, sim, openids),
                store.status(datetime.now(UTC))["reauth_required"])
    finally:
        store.close()


def _sweep_until_idle(keeper: Keeper) -> list[dict[str, object]]:
    summaries = []
    for _ in range(5):
        ran = keeper.run("sweep", "--json")
        assert ran.code == 0, ran.err
        summaries.append(json.loads(ran.out))
        if summaries[-1]["refresh_tokens_refreshed"] == 0:
            break
    return summaries


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_sigterm_during_an_outage_journals_what_was_held_and_the_next_start_writes_it(
    kind: str, sim: Simulator, keeper: Keeper
) -> None:
    url = _db_url(kind, keeper)
    openids = _prepare(keeper, sim, url)
    # Calls long enough that the storm meets the sweep while answers are still coming in
    # (not, say, only its avatar pass, when every result is already written).
    sim.configure(latency_s=0.1)
    proc, log = start_service(keeper)
    outage = Outage(url, seconds=6, when=lambda: refresh_calls(sim) >= 30)
    try:
        assert outage.started.wait(60), log.read_text()[-2000:]
        # Let the sweep meet the outage and the calls in flight come back.
        wait_for(lambda: "database.unavailable" in log.read_text(), timeout=20)
        began = time.monotonic()
        code = stop(proc, timeout=12)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
    outage.wait()
    text_ = log.read_text()
    assert code == 0 and took < 10, (code, took, text_[-2000:])
    files = _journal_files(keeper)
    assert files and "journal.saved" in text_
    raw = b"".join(f.read_bytes() for f in files)
    for user in openids:  # sealed: no token, not even an openid, in the clear
        assert user.encode() not in raw
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    summaries = _sweep_until_idle(keeper)
    assert not _journal_files(keeper)
    lost, reauth = _outcome(keeper, url, sim, openids)
    print(f"journaled {len(files)} file(s); lost {len(lost)}; reauth {reauth}; {took:.1f} s")
    assert lost == [] and reauth == 0, summaries
    assert "Traceback" not in text_ and "worker.failed" not in text_


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_sigkill_mid_sweep_loses_at_most_what_was_in_memory(
    kind: str, sim: Simulator, keeper: Keeper
) -> None:
    """What was committed stays. What a SIGKILL can lose is what the process held in memory:
    the calls in flight (8 workers) and the answers since its last write (a write every 0.25 s
    or 200 results); the test prints how many were lost."""
    url = _db_url(kind, keeper)
    openids = _prepare(keeper, sim, url)
    proc, _ = start_service(keeper)
    try:
        wait_for(lambda: refresh_calls(sim) >= 60, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = refresh_calls(sim)
    lost, _ = _outcome(keeper, url, sim, openids)
    print(f"SIGKILL after {calls} refresh calls: {len(lost)} rotated tokens lost "
          f"(answered, still in memory at the kill)")
    # 8 calls in flight, plus the answers since the last write (one every 0.05 s: about 14
    # at 8 workers and 30 ms a call); with a write every 0.25 s this was 38.
    assert len(lost) <= 30


def test_a_silent_network_is_noticed_survived_and_sigterm_still_stops_keeper(
    sim: Simulator, keeper: Keeper
) -> None:
    """A partition that swallows packets (no reset): ``database.unavailable`` within about
    30 s, recovery after the heal, SIGTERM obeyed within 10 s while a sweep is stuck in the
    partition, and the next start loses nothing."""
    require_blackhole()
    url = require_postgres()
    reset_postgres()
    parsed = make_url(url)
    with silent_proxy((parsed.host or "127.0.0.1", parsed.port or 5432)) as proxy:
        proxied = parsed.set(host=proxy.host, port=proxy.port).render_as_string(
            hide_password=False)
        openids = _prepare(keeper, sim, proxied)
        keeper.write_config(keeper.config.read_text().replace(
            "database_timeout = 1", "database_timeout = 30").replace(
            "sweep_interval = 3600", "sweep_interval = 1"))
        proc, log = start_service(keeper)
        try:
            wait_for(lambda: refresh_calls(sim) >= 30, timeout=60)
            proxy.cut()
            cut_at = time.monotonic()
            wait_for(lambda: "database.unavailable" in log.read_text(), timeout=45)
            noticed = time.monotonic() - cut_at
            proxy.heal()
            wait_for(lambda: "database.recovered" in log.read_text(), timeout=60)
            sim.configure(latency_s=0.3)  # calls in flight while the partition comes
            grants = due_grants(20, scope="snsapi_base")
            for g in grants:
                g["openid"] = f"late-{g['openid']}"
            seed(sim, keeper, grants)
            openids += [str(g["openid"]) for g in grants]
            wait_for(lambda: refresh_calls(sim) >= USERS + 1, timeout=30)
            proxy.cut()  # the sweep's next write meets the partition
            time.sleep(1.5)  # the fault lasts this long: not a wait for a result
            began = time.monotonic()
            code = stop(proc, timeout=12)
            took = time.monotonic() - began
        finally:
            proxy.heal()
            if proc.poll() is None:
                proc.kill()
        sim.configure(latency_s=0.0)
        text_ = log.read_text()
        print(f"partition noticed after {noticed:.1f} s; SIGTERM obeyed in {took:.1f} s")
        assert noticed < 35, text_[-3000:]
        assert code == 0 and took < 10, (code, took, text_[-3000:])
        summaries = _sweep_until_idle(keeper)
        lost, reauth = _outcome(keeper, proxied, sim, openids)
    assert lost == [] and reauth == 0, (summaries, text_[-6000:])
    assert "Traceback" not in text_


def test_a_table_lock_held_elsewhere_is_said_in_one_line_not_sat_behind(
    sim: Simulator, keeper: Keeper
) -> None:
    url = require_postgres()
    reset_postgres()
    keeper.write_config(config_text(db_url=url, api_base=sim.url,
                                    extra="database_timeout = 3"))
    assert keeper.run("db", "upgrade").code == 0
    engine = create_engine(url)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with engine.begin() as conn:
            conn.execute(text("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE"))
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert held.wait(10)
        began = time.monotonic()
        ran = keeper.run("status", timeout=30)
        took = time.monotonic() - began
        proc, log = start_service(keeper)
        try:
            wait_for(lambda: "lock timeout" in log.read_text(), timeout=20)
        finally:
            stop(proc)
    finally:
        release.set()
        holder.join(10)
        engine.dispose()
    assert ran.code == 1 and took < 10, (took, ran.err)
    lines = [e for e in ran.logs() if e["level"] == "error"]
    assert len(lines) == 1 and "lock timeout" in lines[0]["error"]


def test_postgres_connections_carry_keepalives_and_timeouts(tmp_path: Path) -> None:
    url = require_postgres()
    store = Store(url, cipher=TEST_CIPHER, timeout_s=12)
    try:
        with store.engine.connect() as conn:
            settings = {name: conn.execute(text(f"SHOW {name}")).scalar() for name in
                        ("statement_timeout", "lock_timeout", "tcp_keepalives_idle")}
            info = conn.connection.dbapi_connection.info  # type: ignore[union-attr]
            params = info.get_parameters()
    finally:
        store.close()
    assert settings["statement_timeout"] == "12s" and settings["lock_timeout"] == "4s"
    assert params.get("keepalives") == "1" and params.get("tcp_user_timeout") == "10000"


def test_sqlite_waits_for_its_write_lock_no_longer_than_database_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    store = Store(url, cipher=TEST_CIPHER, auto_upgrade=True, timeout_s=1).open()
    outage = Outage(url, seconds=5, when=lambda: True)
    try:
        assert outage.started.wait(5)
        began = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            store.start_sweep(datetime.now(UTC), host="h", pid=1)
        took = time.monotonic() - began
    finally:
        outage.wait()
        store.close()
    assert took < 4



def test_library_lines_of_an_outage_become_quiet_structured_events(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from keeper.log import configure

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure("info", pretty=False)
        logging.getLogger("psycopg").warning("error ignored terminating %r: %s", "conn", "x")
        logging.getLogger("apscheduler.scheduler").warning(
            'Execution of job "sweep" skipped: maximum number of running instances reached (1)')
        logging.getLogger("psycopg").warning("something else")
        assert capsys.readouterr().err.count("\n") == 1
        configure("debug", pretty=False)
        logging.getLogger("psycopg").warning("error ignored terminating %r: %s", "conn", "x")
        line = json.loads(capsys.readouterr().err)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert line["event"] == "database.connection_discarded" and line["level"] == "debug"
