"""The errcode table, row by row, against the simulator: what each answer does to a sweep.

For every code the table lists on the refresh and userinfo endpoints, one user's call answers
it, and the sweep must do what the table's kind says, to that user only: a re-authorization
only for ``reauth``; tokens kept for every other kind; the app skipped (and said once) for
``app``; an error event for ``bug``; the endpoint paused for ``quota``; the profile's errcode
recorded for ``profile_only``. A bystander user is always refreshed and never touched.

One worker, and the bystander due first: its calls are made before the odd user's answer,
whatever the machine's load. (With calls in parallel, a quota answer that came first would
rightly defer the bystander with the rest of the app: that is tests/sweep/test_engine.py's.)
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keeper.core import errcodes
from keeper.service.runtime import Runtime
from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, SECRET
from tests.e2e.helpers import make_grant
from tests.e2e.test_outage import runtime
from tests.sweep.test_engine import put

ROWS = sorted({(endpoint, code, row.kind) for row in errcodes.TABLE for code in row.codes
               for endpoint in row.endpoints if endpoint in ("refresh", "userinfo")})


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = Simulator(seed=3, rotate_refresh_tokens=True)  # a refresh renews: no expiring record
    s.add_app(APPID, SECRET)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def rt(tmp_path: Path, sim: Simulator) -> Iterator[Runtime]:
    r = runtime(f"sqlite:///{tmp_path / 'k.db'}", sim, tmp_path, workers=1)
    yield r
    r.close()


@pytest.mark.parametrize(("endpoint", "errcode", "kind"), ROWS)
def test_each_row_does_what_the_table_says_to_that_user_only(
    rt: Runtime, sim: Simulator, endpoint: str, errcode: int, kind: str
) -> None:
    # "odd" needs a refresh (its refresh day) and a profile read; the bystander the same, an
    # hour sooner, so that it is claimed and worked first.
    put(rt, sim, make_grant("odd", issued_days_ago=29.5, scope="snsapi_login"),
        make_grant("bystander", issued_days_ago=29.5 + 1 / 24, scope="snsapi_login"))
    sim.force(endpoint, errcode, openid="odd")
    sweeper = rt.sweeper()
    try:
        with capture_logs() as logs:
            summary = sweeper.run_once()
    finally:
        sweeper.close()
    events = [e["event"] for e in logs]
    odd = rt.store.get_grant(APPID, "odd")
    bystander = rt.store.get_grant(APPID, "bystander")
    assert odd is not None and bystander is not None
    record = rt.store.reauth_record(odd.id)
    assert "worker.failed" not in events

    if kind == errcodes.REAUTH:
        assert odd.state == "reauth" and record is not None and record.errcode == errcode
    else:
        assert odd.state != "reauth" and record is None
        assert "reauth.recorded" not in events
    if kind == errcodes.APP:
        assert summary["apps_rejected"] == [APPID] and events.count("wechat.app_rejected") == 1
        return  # the app is skipped for the rest of the sweep: the bystander may wait
    renewed = datetime.now(UTC) - timedelta(minutes=5)
    assert bystander.state == "active" and bystander.refresh_issued_at > renewed
    assert rt.store.reauth_record(bystander.id) is None
    assert (rt.store.profile(bystander.id) or {}).get("nickname") or kind == errcodes.QUOTA
    if kind == errcodes.BUG:
        assert summary["keeper_bug_answers"] == 1 and events.count("wechat.keeper_bug") == 1
        assert odd.failures == 1 if endpoint == "refresh" else odd.profile_failures == 1
    if kind == errcodes.QUOTA:
        assert "quota.paused" in events
    if kind == errcodes.PROFILE_ONLY:
        profile = rt.store.profile(odd.id)
        assert profile is not None and profile["errcode"] == errcode
        assert odd.profile_stop == (48001 if errcode == 48001 else None)
    if kind == errcodes.TRANSIENT:
        assert summary["transient_failures"] >= 1
        if endpoint == "userinfo":  # only the profile waits; the refresh was stored
            assert odd.profile_failures == 1 and odd.failures == 0
    if kind == errcodes.STALE_TOKEN:  # refreshed, then the profile read again
        assert summary["stale_access_tokens"] == 1 and (rt.store.profile(odd.id) or {})
