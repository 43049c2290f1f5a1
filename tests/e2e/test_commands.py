"""End to end: the real `keeper` program against the simulator over loopback HTTP."""

from __future__ import annotations

import json
import signal
import time

import pytest

from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, Keeper, wait_for
from tests.e2e.helpers import endpoint, make_grant, seed


def test_sweep_refreshes_what_is_due_and_records_who_must_reauthorize(
    sim: Simulator, keeper: Keeper
) -> None:
    seed(sim, keeper, [
        make_grant("fresh", scope="snsapi_base"),
        make_grant("access-expired", access_in_s=-60, scope="snsapi_base"),
        make_grant("day29", issued_days_ago=29.1, scope="snsapi_base"),
        make_grant("revoked", access_in_s=-60, state="revoked"),
        make_grant("invalid", issued_days_ago=29.5, state="invalid"),
        make_grant("dead", issued_days_ago=31, access_in_s=-60, scope="snsapi_base"),
        make_grant("profiled", unionid="u-profiled"),
        make_grant("snapshot", state="snapshot"),
    ])
    ran = keeper.run("sweep", "--json")
    assert ran.code == 0, ran.err
    summary = json.loads(ran.out)
    assert summary["refresh_tokens_refreshed"] == 1  # day29; dead and invalid were refused
    assert summary["access_tokens_refreshed"] == 1  # access-expired; revoked was refused
    assert summary["profiles_fetched"] == 1  # profiled; snapshot answered 48001
    assert summary["reauth_recorded"] == 4  # revoked, invalid, dead, and day29 expiring
    assert summary["transient_failures"] == 0
    assert "sweep.finished" in ran.events()
    reasons = {r["openid"]: r["reason"] for r in map(json.loads,
               keeper.run("reauth", "--json").out.splitlines())}
    assert reasons == {
        "day29": "refresh_token_expiring", "revoked": "authorization_revoked",
        "invalid": "refresh_token_invalid", "dead": "refresh_token_expired",
    }
    status = json.loads(keeper.run("status", "--json").out)
    assert status["grants"] == 8 and status["reauth_required"] == 4
    assert status["last_sweep"]["summary"]["access_tokens_refreshed"] == 1
    # A second sweep finds nothing new to do.
    again = json.loads(keeper.run("sweep", "--json").out)
    assert again["refresh_tokens_refreshed"] == again["access_tokens_refreshed"] == 0


def test_transient_failures_are_retried_later_and_never_mark_reauth(
    sim: Simulator, keeper: Keeper
) -> None:
    seed(sim, keeper, [make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                       for i in range(5)])
    for kind in ("timeout", "502", "truncated", "html", -1):
        sim.force("refresh", kind)  # type: ignore[arg-type]
    summary = json.loads(keeper.run("sweep", "--json").out)
    assert summary["transient_failures"] == 5 and summary["reauth_recorded"] == 0
    assert keeper.run("reauth", "--json").out == ""
    status = json.loads(keeper.run("status", "--json").out)
    assert status["retrying"] == 5 and status["active"] == 5


def test_grant_with_a_good_a_used_and_a_bad_code(sim: Simulator, keeper: Keeper) -> None:
    code = sim.issue_code(appid=APPID, openid="new-user", unionid="u-new")
    ran = keeper.run("grant", "--app", APPID, code)
    assert ran.code == 0 and ran.out.strip() == "new-user"
    used = keeper.run("grant", "--app", APPID, code)
    assert used.code == 2 and "40163" in used.err
    bad = keeper.run("grant", "--app", APPID, "not-a-code")
    assert bad.code == 2 and "40029" in bad.err
    assert endpoint(sim, "code")["calls"] == 3  # never retried
    profile = json.loads(keeper.run("profile", "--app", APPID, "new-user", "--json").out)
    assert profile["unionid"] == "u-new" and profile["state"] == "active"


def test_a_transient_failure_of_a_code_exchange_is_not_retried(
    sim: Simulator, keeper: Keeper
) -> None:
    code = sim.issue_code(appid=APPID, openid="o1")
    sim.force("code", -1)
    ran = keeper.run("grant", "--app", APPID, code)
    assert ran.code == 1 and endpoint(sim, "code")["calls"] == 1


def test_a_new_grant_clears_the_reauth_record(sim: Simulator, keeper: Keeper) -> None:
    seed(sim, keeper, [make_grant("o1", access_in_s=-60, state="revoked")])
    keeper.run("sweep")
    assert "o1" in keeper.run("reauth").out
    ran = keeper.run("grant", "--app", APPID, sim.issue_code(appid=APPID, openid="o1"))
    assert ran.code == 0 and keeper.run("reauth").out == ""


def test_import_reports_bad_lines_by_number_and_imports_the_rest(
    sim: Simulator, keeper: Keeper
) -> None:
    good = make_grant("o1")
    lines = [json.dumps({k: v for k, v in good.items() if k not in ("state", "unionid")}),
             "{broken", json.dumps({"appid": APPID}), ""]
    ran = keeper.run("import", "-", "--json", stdin="\n".join(lines))
    assert ran.code == 2
    assert json.loads(ran.out) == {"imported": 1, "bad_lines": 2}
    bad = [e for e in ran.logs() if e["event"] == "import.bad_line"]
    assert [e["line"] for e in bad] == [2, 3]
    assert json.loads(keeper.run("status", "--json").out)["grants"] == 1


def test_token_prints_a_valid_token_refreshing_first_if_needed(
    sim: Simulator, keeper: Keeper
) -> None:
    seed(sim, keeper, [make_grant("valid"), make_grant("stale", access_in_s=-60),
                       make_grant("revoked", access_in_s=-60, state="revoked")])
    ran = keeper.run("token", "--app", APPID, "valid")
    assert ran.code == 0 and ran.out.strip() == "AT-valid-e2e-secret"
    assert endpoint(sim, "refresh")["calls"] == 0
    ran = keeper.run("token", "--app", APPID, "stale")
    assert ran.code == 0 and ran.out.strip() and ran.out.strip() != "AT-stale-e2e-secret"
    assert keeper.run("check", "--app", APPID, "stale").code == 0
    ran = keeper.run("token", "--app", APPID, "revoked")
    assert ran.code == 1 and ran.out == "" and "authorization_revoked" in ran.err


def test_check_asks_wechat(sim: Simulator, keeper: Keeper) -> None:
    seed(sim, keeper, [make_grant("ok"), make_grant("expired", access_in_s=-60)])
    assert keeper.run("check", "--app", APPID, "ok").code == 0
    ran = keeper.run("check", "--app", APPID, "expired", "--json")
    assert ran.code == 1 and json.loads(ran.out)["errcode"] == 42001


def test_bad_config_is_refused_with_one_line_naming_the_key(keeper: Keeper) -> None:
    keeper.write_config('workers = "lots"\n')
    ran = keeper.run("status")
    assert ran.code == 2 and len(ran.err.strip().splitlines()) == 1 and "workers" in ran.err


def test_an_unreachable_database_exits_1(keeper: Keeper) -> None:
    keeper.write_config('encryption_key_file = "keeper.key"\n')
    keeper.env["KEEPER_DATABASE_URL"] = "postgresql+psycopg://u:pw@127.0.0.1:1/x"
    ran = keeper.run("status")
    assert ran.code == 1 and "database" in ran.err and "pw@" not in ran.err


def test_run_sweeps_and_stops_gracefully_on_sigterm(sim: Simulator, keeper: Keeper) -> None:
    seed(sim, keeper, [make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                       for i in range(20)])
    proc = keeper.start("run")
    try:
        wait_for(lambda: endpoint(sim, "refresh")["ok"] == 20, timeout=20)
        wait_for(lambda: json.loads(keeper.run("status", "--json").out)["last_sweep"]
                 is not None, timeout=20)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert time.monotonic() - started < 10
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert events[0] == "keeper.started" and events[-1] == "keeper.stopped"
    assert "sweep.finished" in events


@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_run_stops_on_sigint_too(sim: Simulator, keeper: Keeper, signum: int) -> None:
    proc = keeper.start("run")
    try:
        wait_for(lambda: json.loads(keeper.run("status", "--json").out)["last_sweep"]
                 is not None, timeout=20)
        proc.send_signal(signum)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0


def test_on_demand_sweeps_keep_refresh_tokens_alive_and_leave_access_tokens_to_the_caller(
    sim: Simulator, keeper: Keeper
) -> None:
    """access_refresh = "on_demand": no call for an expired access token alone; the refresh
    day and a profile read (which needs a valid access token) still refresh; `keeper token`
    refreshes when asked."""
    keeper.write_config(keeper.config.read_text().replace(
        'log_level = "debug"', 'log_level = "debug"\naccess_refresh = "on_demand"'))
    seed(sim, keeper, [
        make_grant("expired", access_in_s=-60, scope="snsapi_base"),
        make_grant("day29", issued_days_ago=29.1, access_in_s=-60, scope="snsapi_base"),
        make_grant("profile-due", access_in_s=-60, scope="snsapi_userinfo"),
    ])
    summary = json.loads(keeper.run("sweep", "--json").out)
    assert summary["refresh_tokens_refreshed"] == 1  # day29
    assert summary["access_tokens_refreshed"] == 1  # profile-due, to read the profile
    assert summary["profiles_fetched"] == 1 and summary["transient_failures"] == 0
    assert endpoint(sim, "refresh")["calls"] == 2
    again = json.loads(keeper.run("sweep", "--json").out)
    assert again["access_tokens_refreshed"] == again["refresh_tokens_refreshed"] == 0
    ran = keeper.run("token", "--app", APPID, "expired")
    assert ran.code == 0 and ran.out.strip() == sim.current_tokens()["expired"][0]
    assert endpoint(sim, "refresh")["calls"] == 3
