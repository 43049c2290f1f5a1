"""A grant's outcome is its own: one user's odd answer never costs another user anything.

Run on SQLite and PostgreSQL with rotating refresh tokens, where a result that is not stored
shows up as a lost token (the next refresh would answer 40030, a false re-authorization).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keeper.service.runtime import Runtime
from keeper.sweep.engine import Sweeper
from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, SECRET
from tests.e2e.helpers import make_grant
from tests.e2e.test_outage import lost_tokens, runtime
from tests.sweep.test_engine import put

USERS = 60


@pytest.fixture
def rotating() -> Iterator[Simulator]:
    s = Simulator(rotate_refresh_tokens=True, seed=5)
    s.add_app(APPID, SECRET)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def rt(migrated_url: str, rotating: Simulator, tmp_path: Path) -> Iterator[Runtime]:
    r = runtime(migrated_url, rotating, tmp_path)
    yield r
    r.close()


def sweep_until_idle(sweeper: Sweeper) -> list[dict[str, object]]:
    summaries = []
    for _ in range(4):
        summaries.append(sweeper.run_once())
        if not summaries[-1]["refresh_tokens_refreshed"]:
            break
    return summaries


def test_odd_profiles_cost_no_other_user_anything(rt: Runtime, rotating: Simulator) -> None:
    """Given 60 users on their refresh day whose tokens rotate, one nickname holding an escaped
    NUL, one a truncated emoji, one whose profile read answers 42001 and then 40001 after
    keeper's refresh, and one whose profile is another user's: every rotated token is stored,
    no one is recorded as must-re-authorize, the odd profiles are stored cleaned, and the
    profile that cannot be used waits alone."""
    sim = rotating
    grants = [make_grant(f"u{i:03d}", issued_days_ago=29.5, scope="snsapi_login")
              for i in range(USERS)]
    grants[0]["profile"] = {"nickname": "nul\u0000here"}
    grants[1]["profile"] = {"nickname": "emoji\ud83d", "city": "\x08"}
    grants[3]["profile"] = {"openid": "someone-else"}
    put(rt, sim, *grants)
    sim.force("userinfo", 42001, openid="u002")
    sim.force("userinfo", 40001, openid="u002")
    sweeper = rt.sweeper()
    try:
        with capture_logs() as logs:
            summaries = sweep_until_idle(sweeper)
    finally:
        sweeper.close()
    openids = [str(g["openid"]) for g in grants]
    assert lost_tokens(rt.store, sim, openids) == []
    assert rt.store.status(datetime.now(UTC))["reauth_required"] == 0
    events = [e["event"] for e in logs]
    assert "worker.failed" not in events and "result.unwritable" not in events, events
    assert events.count("wechat.openid_mismatch") == 1

    def stored(openid: str) -> dict[str, object]:
        grant = rt.store.get_grant(APPID, openid)
        assert grant is not None
        return rt.store.profile(grant.id) or {}

    assert stored("u000")["nickname"] == "nulhere"
    assert stored("u001")["nickname"] == "emoji\ufffd" and stored("u001")["city"] == ""
    assert stored("u002") == {} and stored("u003") == {}
    assert all(stored(o)["nickname"] for o in openids[4:])
    for openid in ("u002", "u003"):
        grant = rt.store.get_grant(APPID, openid)
        assert grant is not None and grant.profile_failures == 1 and grant.failures == 0
    assert summaries[0]["refresh_tokens_refreshed"] == USERS
    assert summaries[0]["profile_failures"] == 2
