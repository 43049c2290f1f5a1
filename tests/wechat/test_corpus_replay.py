"""The corpus of real-shaped answers (keeper/wechat/simulator/answers.py, each entry citing
where it was reported) replayed through full sweeps, on SQLite and PostgreSQL, with rotating
refresh tokens.

Every user meets one odd answer on its refresh or its profile read, beside ordinary users.
Whatever the answer, the outcome is the user's own: every usable profile is stored cleaned,
no rotated token is lost, no one is recorded as must-re-authorize but for WeChat's definitive
answers, and nothing raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keeper.service.runtime import Runtime
from keeper.wechat.simulator import ODD_ANSWERS, Simulator
from tests.conftest import APPID, SECRET
from tests.e2e.helpers import make_grant
from tests.e2e.test_outage import lost_tokens, runtime
from tests.sweep.test_engine import put

#: (user, endpoint, entry) for every entry a sweep can meet: refresh and userinfo answers.
#: Quota answers (45009, 45011) are left out: they pause the endpoint for the whole app by
#: design (the app's quota is WeChat's, not the user's), which tests/test_errcodes.py covers.
CASES = [(f"c{i:03d}", endpoint, odd) for i, (endpoint, odd) in enumerate(
    (endpoint, odd) for odd in ODD_ANSWERS for endpoint in odd.endpoints
    if endpoint in ("refresh", "userinfo") and odd.conclusion(endpoint) != "quota")]
#: What WeChat decides for good: the only answers that may record a re-authorization.
DEFINITIVE = {"reauth", "stop_token"}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = Simulator(rotate_refresh_tokens=True, seed=13)
    s.add_app(APPID, SECRET)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def rt(migrated_url: str, sim: Simulator, tmp_path: Path) -> Iterator[Runtime]:
    r = runtime(migrated_url, sim, tmp_path)
    yield r
    r.close()


def test_the_corpus_replayed_through_sweeps_loses_nothing(rt: Runtime, sim: Simulator) -> None:
    users = [make_grant(user, issued_days_ago=29.5, scope="snsapi_login")
             for user, _, _ in CASES]
    bystanders = [make_grant(f"b{i:02d}", issued_days_ago=29.5, scope="snsapi_login")
                  for i in range(20)]
    put(rt, sim, *users, *bystanders)
    for user, endpoint, odd in CASES:
        sim.script(user, endpoint, odd.name)
    sweeper = rt.sweeper()
    try:
        with capture_logs() as logs:
            # An answer refusing the app skips the app for the rest of that sweep: sweep on
            # until a sweep is refused nothing and finds nothing left to refresh.
            sweeps = 0
            while sweeps < 15:
                sweeps += 1
                summary = sweeper.run_once()
                assert not summary["wechat_unavailable"]  # odd answers are still answers
                if not summary["apps_rejected"] and not summary["refresh_tokens_refreshed"]:
                    break
    finally:
        sweeper.close()
    assert not [e for e in logs if e["event"] in ("worker.failed", "result.unwritable",
                                                   "sweep.crashed") or "exc_info" in e]
    assert sim.stats()["scripted_served"] == {odd.name: sum(
        1 for _, _, o in CASES if o.name == odd.name) for _, _, odd in CASES
        if not odd.name.startswith("errcode_")}

    openids = [str(g["openid"]) for g in users + bystanders]
    assert lost_tokens(rt.store, sim, openids) == []
    recorded = {r["openid"] for r in rt.store.iter_reauth()}
    should = {user for user, endpoint, odd in CASES if odd.conclusion(endpoint) in DEFINITIVE}
    assert recorded == should

    stored_profiles = 0
    for user, endpoint, odd in CASES:
        grant = rt.store.get_grant(APPID, user)
        assert grant is not None
        profile = rt.store.profile(grant.id) or {}
        if endpoint == "userinfo" and odd.expect == "profile":
            stored_profiles += 1
            for key, value in odd.fields.items():
                if key == "nickname" and "gbk" in odd.name:
                    continue
                assert profile[key] == value, (odd.name, key)
        if odd.conclusion(endpoint) in ("malformed", "mismatch", "transient", "unknown", "bug"):
            # Kept what was stored, and only that call's step waits.
            assert grant.state == "active", odd.name
            if endpoint == "userinfo":
                assert grant.profile_failures == 1 and grant.failures == 0, odd.name
            else:
                assert grant.failures == 1, odd.name
    for g in bystanders:
        grant = rt.store.get_grant(APPID, str(g["openid"]))
        assert grant is not None and grant.refresh_issued_at.date() == datetime.now(UTC).date()
        assert (rt.store.profile(grant.id) or {}).get("fetched_at")
    print(f"{len(CASES)} odd answers replayed; {stored_profiles} odd profiles stored; "
          f"{len(recorded)} re-authorizations (all definitive) in {sweeps} sweeps")
