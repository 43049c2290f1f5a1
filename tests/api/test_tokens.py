"""Tokens on demand through ``keeper serve``: one refresh call for many requests at once,
waiting for a sweep that holds the grant, WeChat or the quota unavailable (503, never a
re-authorization), the database failing after WeChat answered (nothing lost), SIGTERM."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from keeper.api.tokens import TokenDesk, Unavailable
from keeper.clock import utcnow
from keeper.config import build_config
from keeper.crypto import Cipher, load_keys
from keeper.service.runtime import Runtime
from keeper.store.grants import Store
from keeper.store.rows import new_lease_id
from keeper.wechat.simulator import Simulator
from tests.api.server import Served, free_port, make_keys, serving, stop, wait_healthy
from tests.conftest import (
    APPID,
    SECRET,
    Keeper,
    clock_offset_env,
    config_text,
    pass_lease_time,
    wait_for,
)
from tests.e2e.helpers import endpoint, make_grant, seed
from tests.e2e.outage import Outage
from tests.store.test_grants import told
from tests.sweep.test_engine import key_file, put


def store_of(served: Served, db_url: str) -> Store:
    cipher = Cipher(load_keys([served.keeper.workdir / "keeper.key"]))
    return Store(db_url, cipher=cipher, pool_size=1).open()


@pytest.fixture
def served2(keeper: Keeper, sim: Simulator, db_url: str) -> Iterator[Served]:
    """Two server processes (uvicorn workers) on one socket, a 1 s wait for busy grants."""
    # A read timeout well above the simulator's latencies here: on a loaded machine a refresh
    # WeChat answered must not time out on keeper's side (with rotating refresh tokens the
    # next try would then be refused, and count as a second call).
    with serving(keeper, db_url=db_url, api_base=sim.url, read_timeout=5,
                 api_extra="processes = 2\ntoken_wait = \"3s\"") as s:
        yield s


def test_fifty_requests_at_once_for_one_stale_token_make_one_refresh_call(
    served2: Served, sim: Simulator
) -> None:
    sim.configure(latency_s=0.3, rotate_refresh_tokens=True)
    seed(sim, served2.keeper, [make_grant("o-hot", access_in_s=60)])  # inside the margin
    path = served2.user(APPID, "o-hot", "/token")
    barrier = threading.Barrier(50)

    def ask(_: int) -> tuple[int, str]:
        with requests.Session() as s:
            barrier.wait()
            r = s.get(served2.base + path, timeout=30,
                      headers={"Authorization": f"Bearer {served2.keys['tokens']}"})
        return r.status_code, r.json().get("access_token", r.text)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert endpoint(sim, "refresh")["calls"] == 1
    new_access = sim.current_tokens()["o-hot"][0]
    assert answers == [(200, new_access)] * 50
    # And it is stored: the next request is answered from the database, without WeChat.
    assert served2.call("GET", path).json()["access_token"] == new_access
    assert endpoint(sim, "refresh")["calls"] == 1


def test_min_valid_decides_whether_a_token_is_refreshed_first(
    served: Served, sim: Simulator
) -> None:
    seed(sim, served.keeper, [make_grant("o-mv", access_in_s=3600)])
    path = served.user(APPID, "o-mv", "/token")
    assert served.call("GET", path).json()["access_token"] == "AT-o-mv-e2e-secret"
    assert served.call("GET", path + "?min_valid=0").json()["access_token"] \
        == "AT-o-mv-e2e-secret"
    assert endpoint(sim, "refresh")["calls"] == 0
    fresh = served.call("GET", path + "?min_valid=4000").json()
    assert endpoint(sim, "refresh")["calls"] == 1
    # WeChat keeps an access token that has not expired and extends its life (reference: 若
    # access_token未超时 … 相当于续期access_token).
    assert fresh["access_token"] == sim.current_tokens()["o-mv"][0]
    expires = datetime.fromisoformat(fresh["expires_at"])
    assert expires > datetime.now(UTC) + timedelta(seconds=4000)


def test_a_request_for_a_grant_a_sweep_holds_waits_for_the_sweep_result(
    served2: Served, sim: Simulator, db_url: str
) -> None:
    seed(sim, served2.keeper, [make_grant("o-held", access_in_s=-10),
                               make_grant("o-stuck", access_in_s=-10)])
    store = store_of(served2, db_url)
    now = datetime.now(UTC)
    try:
        lease = new_lease_id()
        held = store.claim_one(APPID, "o-held", lease_id=lease,
                               lease_s=3600, now=now)
        assert held is not None
        # The "sweep" finishes while the request waits: it answers with the sweep's token.
        pending: list[requests.Response] = []
        asker = threading.Thread(target=lambda: pending.append(
            served2.call("GET", served2.user(APPID, "o-held", "/token"))))
        asker.start()
        from dataclasses import replace

        from keeper.core.policy import Schedule
        from keeper.store.rows import GrantWrite
        renewed = replace(held, access_token="AT-from-the-sweep",
                          access_expires_at=now + timedelta(hours=2))
        store.apply([GrantWrite(renewed, Schedule(None, None, None))], lease, now)
        asker.join(30)
        assert pending[0].status_code == 200
        assert pending[0].json()["access_token"] == "AT-from-the-sweep"

        # A grant a crashed process holds (its lease runs an hour), token expired: 503
        # grant_busy after token_wait, with Retry-After; nothing is recorded against the user.
        assert store.claim_one(APPID, "o-stuck", lease_id=new_lease_id(),
                               lease_s=3600, now=now) is not None
        r = served2.call("GET", served2.user(APPID, "o-stuck", "/token"))
        assert r.status_code == 503 and r.json()["error"] == "grant_busy"
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        store.close()
    assert endpoint(sim, "refresh")["calls"] == 0
    assert served2.call("GET", "/v1/reauth").json()["users"] == []


def test_an_on_demand_refresh_after_a_takeover_tells_nobody_the_user_is_dead(
    migrated_url: str, sim: Simulator, tmp_path: Path
) -> None:
    """The token desk (``keeper serve``, ``keeper token``) shares the sweep's leases: given a
    sweep froze past its lease after WeChat rotated a grant's tokens for it, a token request
    that takes the grant over is answered 40030. The caller gets 503 ``grant_busy``, not 409
    ``reauth_required``; nothing is recorded; asking again makes no call while the answer is
    held; once the frozen sweep writes, the caller gets WeChat's new token."""
    config = build_config(
        {"database_url": migrated_url, "api_base": sim.url, "workers": 2,
         "encryption_key_file": str(key_file(tmp_path)), "read_timeout": 0.5,
         "connect_timeout": 0.5, "lease": "1m", "apps": [{"appid": APPID, "secret_env": "S"}]},
        env={"S": SECRET}, source="test")
    sim.configure(rotate_refresh_tokens=True)
    with Runtime.build(config) as rt:
        put(rt, sim, make_grant("o-frozen", access_in_s=-60, scope="snsapi_base"))
        now = datetime.now(UTC)
        [a] = rt.store.claim(appids=[APPID], cutoff=now, limit=1, lease_id="A", lease_s=60,
                             now=now)
        frozen = rt.worker.work(a)
        assert frozen.write is not None
        pass_lease_time(rt.store, 61)
        desk = TokenDesk(store=rt.store, worker=rt.worker, lease_s=config.lease_s, wait_s=0.2,
                         clock=utcnow)
        for _ in range(2):
            with pytest.raises(Unavailable) as busy:
                desk.token(APPID, "o-frozen", min_valid_s=600)
            assert busy.value.code == "grant_busy"
        assert endpoint(sim, "refresh")["errors"] == {"40030": 1}
        assert told(rt.store) == []
        assert rt.store.apply([frozen.write], "A", utcnow()) == 1
        token = desk.token(APPID, "o-frozen", min_valid_s=600)
        assert token.access_token == sim.current_tokens()["o-frozen"][0]
        assert told(rt.store) == []


ANSWERS = [("timeout", "wechat_unavailable"), ("502", "wechat_unavailable"),
           ("html", "wechat_unavailable"), (-1, "wechat_unavailable"),
           (40164, "wechat_unavailable"), (45011, "quota_exhausted"),
           (45009, "quota_exhausted")]


def test_wechat_or_its_quota_unavailable_is_503_never_a_reauthorization(
    served: Served, sim: Simulator
) -> None:
    seed(sim, served.keeper, [make_grant(f"o-down{i}", access_in_s=-10)
                              for i in range(len(ANSWERS))])
    for i, (answer, error) in enumerate(ANSWERS):
        path = served.user(APPID, f"o-down{i}", "/token")
        sim.force("refresh", answer)  # type: ignore[arg-type]
        r = served.call("GET", path)
        assert r.status_code == 503, (answer, r.text)
        assert r.json()["error"] == error and int(r.headers["Retry-After"]) >= 1
        assert f"AT-o-down{i}" not in r.text
        if answer == 45011:
            continue  # paused until the minute rolls: maybe in a moment, maybe at once
        if answer == 45009:
            # The daily quota: paused until the day rolls, shared by every process; no call.
            calls = endpoint(sim, "refresh")["calls"]
            again = served.call("GET", path)
            assert again.status_code == 503 and again.json()["error"] == "quota_exhausted"
            assert int(again.headers["Retry-After"]) >= 1
            assert endpoint(sim, "refresh")["calls"] == calls
        else:
            r = served.call("GET", path)
            assert r.status_code == 200, (answer, r.text)
            assert r.json()["access_token"] == sim.current_tokens()[f"o-down{i}"][0]
    status = json.loads(served.keeper.run("status", "--json").out)
    assert status["reauth_required"] == 0 and status["active"] == len(ANSWERS)


def test_a_token_wechat_renewed_while_the_database_failed_is_not_lost(
    keeper: Keeper, sim: Simulator, tmp_path: Path
) -> None:
    """The refresh answer arrives while another connection holds SQLite's write lock: the
    write fails after database_timeout, the answer goes to the journal, the caller still gets
    the new token, and the replay thread writes it once the lock is gone."""
    url = f"sqlite:///{tmp_path / 'keeper.db'}"
    with serving(keeper, db_url=url, api_base=sim.url, read_timeout=5,
                 extra='database_timeout = "1s"') as served:
        # Long enough for the lock to be taken while the call is in flight.
        sim.configure(latency_s=0.25, rotate_refresh_tokens=True)
        seed(sim, keeper, [make_grant("o-blip", access_in_s=-10)])
        outage = Outage(url, seconds=3, when=lambda: endpoint(sim, "refresh")["calls"] > 0)
        r = served.call("GET", served.user(APPID, "o-blip", "/token"))
        outage.wait()
        access, refresh = sim.current_tokens()["o-blip"]
        assert r.status_code == 200 and r.json()["access_token"] == access, r.text
        store = store_of(served, url)
        try:
            wait_for(lambda: (g := store.get_grant(APPID, "o-blip")) is not None
                     and g.refresh_token == refresh, timeout=20)
        finally:
            store.close()
        code, err = stop(served.proc)
    assert code == 0
    assert "journal.saved" in err and "journal.replayed" in err
    assert not list((tmp_path / "var" / "journal").glob("*.journal"))


def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(
    keeper: Keeper, sim: Simulator, tmp_path: Path
) -> None:
    with serving(keeper, db_url=f"sqlite:///{tmp_path / 'keeper.db'}", api_base=sim.url,
                 read_timeout=5) as served:
        seed(sim, keeper, [make_grant("o-term", access_in_s=-10)])
        sim.configure(latency_s=1.0)  # in flight when SIGTERM comes
        answers: list[requests.Response] = []
        asker = threading.Thread(target=lambda: answers.append(
            served.call("GET", served.user(APPID, "o-term", "/token"))))
        asker.start()
        wait_for(lambda: endpoint(sim, "refresh")["calls"] == 1)
        code, err = stop(served.proc, timeout=12)
        asker.join(10)
    assert code == 0
    assert answers and answers[0].status_code == 200
    assert answers[0].json()["access_token"] == sim.current_tokens()["o-term"][0]
    assert "api.stopped" in err


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def test_serve_listens_on_a_unix_socket(keeper: Keeper, sim: Simulator, tmp_path: Path) -> None:
    sock = Path("/tmp") / f"keeper-api-test-{new_lease_id()}.sock"  # sun_path is short
    keeper.write_config(config_text(db_url=f"sqlite:///{tmp_path / 'keeper.db'}",
                                    api_base=sim.url)
                        + f'\n[api]\nlisten = "unix:{sock}"\nkeys_file = "api-keys"\n')
    keys = make_keys(keeper)
    proc = keeper.start("serve")
    try:
        wait_for(sock.exists, timeout=20)
        conn = _UnixConnection(str(sock))
        conn.request("GET", "/v1/reauth", headers={"Authorization": f"Bearer {keys['read']}"})
        r = conn.getresponse()
        assert (r.status, json.loads(r.read())) == (200, {"users": [], "next": "0"})
        conn.close()
    finally:
        code, _ = stop(proc)
    assert code == 0 and not sock.exists()


def test_serve_refuses_bad_setup_with_one_line(keeper: Keeper, sim: Simulator,
                                                tmp_path: Path) -> None:
    base = config_text(db_url=f"sqlite:///{tmp_path / 'keeper.db'}", api_base=sim.url)
    cases = {
        '[api]\nkeys_file = "missing-keys"\n': "does not exist",
        '[api]\nlisten = "0.0.0.0"\n': "api.listen",
        '[api]\nlisten = "unix:relative.sock"\n': "api.listen",
        '[api]\nprocesses = 0\n': "api.processes",
        '[api]\nkeys = "x"\n': "api.keys",
        'access_refresh = "sometimes"\n': "access_refresh",
    }
    (keeper.workdir / "bad-keys").write_text("site tokens sha256:abc\n")
    cases['[api]\nkeys_file = "bad-keys"\n'] = "bad-keys, line 1"
    for extra, needle in cases.items():
        if extra.startswith("access_refresh"):
            keeper.write_config(base.replace('log_level = "debug"',
                                             'log_level = "debug"\n' + extra))
        else:
            keeper.write_config(base + "\n" + extra)
        ran = keeper.run("serve", timeout=30)
        errors = [e for e in ran.logs() if e["level"] == "error"]
        assert ran.code == 2 and len(errors) == 1 and needle in errors[0]["error"], ran.err

    # The port is taken: exit 1, one line naming the failure.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        keeper.write_config(base + f'\n[api]\nlisten = "127.0.0.1:{port}"\n'
                                   'keys_file = "api-keys"\n')
        make_keys(keeper)
        ran = keeper.run("serve", timeout=30)
    assert ran.code == 1 and "Traceback" not in ran.err


def test_api_key_prints_a_key_once_and_the_line_for_the_keys_file(keeper: Keeper) -> None:
    ran = keeper.run("api-key", "--name", "shop", "--scopes", "tokens,read", "--json")
    made = json.loads(ran.out)
    assert ran.code == 0 and made["name"] == "shop" and made["scopes"] == ["tokens", "read"]
    assert made["key"].startswith("kpr_") and len(made["key"]) >= 4 + 43
    name, scopes, digest = made["line"].split()
    assert (name, scopes) == ("shop", "tokens,read") and digest.startswith("sha256:")
    assert made["key"] not in ran.err and made["key"] not in made["line"]
    for bad in (["--scopes", "admin"], ["--scopes", ""], ["--name", "a b", "--scopes", "read"]):
        args = ["--name", "x", *bad] if bad[0] == "--scopes" else bad
        assert keeper.run("api-key", *args).code == 2


def test_serve_is_a_process_of_its_own_beside_keeper_run(
    served: Served, sim: Simulator
) -> None:
    seed(sim, served.keeper, [make_grant(f"o{i}", access_in_s=-10) for i in range(20)])
    service: subprocess.Popen[str] = served.keeper.start("run")
    try:
        for i in range(20):
            r = served.call("GET", served.user(APPID, f"o{i}", "/token"))
            assert r.status_code == 200, r.text
            assert r.json()["access_token"] == sim.current_tokens()[f"o{i}"][0]
    finally:
        stop(service)
    # Each grant was refreshed once, by whichever process leased it first.
    assert endpoint(sim, "refresh")["calls"] == 20
    wait_healthy(served.base, served.proc)


def test_a_login_survives_a_database_blip_while_it_is_stored(
    keeper: Keeper, sim: Simulator, tmp_path: Path
) -> None:
    """The code is spent once WeChat answers: a short outage while the grant is stored is
    waited out (the store is tried again), not turned into a lost login."""
    url = f"sqlite:///{tmp_path / 'keeper.db'}"
    with serving(keeper, db_url=url, api_base=sim.url,
                 extra='database_timeout = "1s"') as served:
        sim.configure(latency_s=0.25)
        outage = Outage(url, seconds=2, when=lambda: endpoint(sim, "code")["calls"] > 0)
        r = served.call("POST", "/v1/grants",
                        json={"appid": APPID, "code": sim.issue_code(appid=APPID, openid="o-l")})
        outage.wait()
        assert r.status_code == 201, r.text
        assert served.call("GET", served.user(APPID, "o-l", "/token")).json()["access_token"] \
            == sim.current_tokens()["o-l"][0]
        _, err = stop(served.proc)
    assert "grant.store_retry" in err


@pytest.mark.db
def test_serve_waits_for_an_upgraded_schema_then_serves(keeper: Keeper, sim: Simulator) -> None:
    """As keeper run does: a PostgreSQL database not yet upgraded is waited for (one line),
    not a crash per server process; `keeper db upgrade` lets it start by itself."""
    from tests.conftest import require_postgres, reset_postgres

    url = require_postgres()
    reset_postgres()
    port = free_port()
    keeper.write_config(config_text(db_url=url, api_base=sim.url)
                        + f'\n[api]\nlisten = "127.0.0.1:{port}"\nkeys_file = "api-keys"\n')
    make_keys(keeper)
    proc = keeper.start("serve")
    try:
        assert proc.stderr is not None
        waited = ""
        while "database.schema_outdated" not in waited:
            line = proc.stderr.readline()
            assert line, "keeper serve ended without saying what it waits for"
            waited += line
        assert keeper.run("db", "upgrade").code == 0
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=30)
    finally:
        code, err = stop(proc)
    assert code == 0 and "Traceback" not in waited + err
    assert "database.recovered" in err


def _to_china_midnight() -> float:
    """Seconds from now (this machine's clock, which is PostgreSQL's) to midnight in China."""
    now = datetime.now(UTC)
    local = now.astimezone(timezone(timedelta(hours=8)))
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_retry_after_of_a_quota_pause_is_measured_on_the_databases_clock(
    keeper: Keeper, sim: Simulator, db_url: str,
) -> None:
    """Given ``keeper serve`` on a host whose clock runs 90 s ahead of the database's
    (libfaketime), when WeChat answers 45009 (the daily quota: paused until midnight in China,
    placed by the database's clock, which every host shares), then Retry-After is the time to
    that midnight by the database's clock, on the answer that paused and on the next request
    (which the shared pause answers), not 90 s less."""
    keeper.env.update(clock_offset_env(90))
    with serving(keeper, db_url=db_url, api_base=sim.url) as served:
        seed(sim, keeper, [make_grant("o-skew", access_in_s=-10)])
        path = served.user(APPID, "o-skew", "/token")
        sim.force("refresh", 45009)
        for _ in range(2):
            before = _to_china_midnight()
            r = served.call("GET", path)
            after = _to_china_midnight()
            assert r.status_code == 503 and r.json()["error"] == "quota_exhausted", r.text
            wait = int(r.headers["Retry-After"])
            assert after - 2 <= wait <= before + 2, (wait, before)
