"""Several keeper processes on one database: no grant worked twice, quotas shared."""

from __future__ import annotations

import json
import signal

import pytest

from keeper.wechat.simulator import SimQuota, Simulator
from tests.conftest import Keeper, config_text, require_postgres, reset_postgres, wait_for
from tests.e2e.helpers import endpoint, make_grant, seed


@pytest.fixture(params=["sqlite", "postgresql"])
def shared(request: pytest.FixtureRequest, keeper: Keeper, sim: Simulator) -> Keeper:
    """keeper on each database kind (PostgreSQL migrated with `keeper db upgrade`)."""
    if request.param == "postgresql":
        url = require_postgres()
        reset_postgres()
        keeper.write_config(config_text(db_url=url, api_base=sim.url))
        ran = keeper.run("db", "upgrade")
        assert ran.code == 0, ran.err
    return keeper


def test_a_sweep_beside_the_service_never_refreshes_a_grant_twice(
    sim: Simulator, shared: Keeper
) -> None:
    seed(sim, shared, [make_grant(f"o{i:03d}", access_in_s=-60, scope="snsapi_base")
                       for i in range(240)])
    sim.configure(latency_s=0.02)
    service = shared.start("run")
    try:
        one_off = shared.run("sweep", "--json")
        assert one_off.code == 0, one_off.err
        wait_for(lambda: endpoint(sim, "refresh")["ok"] >= 240, timeout=30)
        service.send_signal(signal.SIGTERM)
        _, err = service.communicate(timeout=15)
    finally:
        if service.poll() is None:
            service.kill()
    assert service.returncode == 0, err
    per_user = sim.stats(detail=True)["refreshes_by_openid"]
    assert isinstance(per_user, dict) and len(per_user) == 240
    assert set(per_user.values()) == {1}
    assert endpoint(sim, "refresh")["calls"] == 240


def test_two_sweeps_together_stay_within_the_quota_and_use_it(
    sim: Simulator, shared: Keeper
) -> None:
    shared.write_config(shared.config.read_text().replace(
        "[[apps]]", '[quotas]\nrefresh = "20/2 seconds"\n\n[[apps]]'))
    sim.configure(quotas={"refresh": SimQuota(20, 2.0)})
    seed(sim, shared, [make_grant(f"o{i:03d}", access_in_s=-60, scope="snsapi_base")
                       for i in range(30)])
    first, second = shared.start("sweep", "--json"), shared.start("sweep", "--json")
    outs = [p.communicate(timeout=60)[0] for p in (first, second)]
    assert first.returncode == second.returncode == 0
    refreshed = sum(json.loads(o)["access_tokens_refreshed"] for o in outs)
    stats = endpoint(sim, "refresh")
    assert refreshed == 30 and stats["ok"] == 30
    assert stats["quota_rejected"] == 0
    assert stats["max_sliding_window"] <= 20 and stats["max_fixed_window"] <= 20


def test_a_minute_quota_answer_pauses_the_endpoint_and_marks_nobody(
    sim: Simulator, keeper: Keeper
) -> None:
    # A 2-second quota window, so the pause rolls over quickly.
    keeper.write_config(keeper.config.read_text().replace(
        "[[apps]]", '[quotas]\nrefresh = "1000/2 seconds"\n\n[[apps]]'))
    seed(sim, keeper, [make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                       for i in range(10)])
    sim.force("refresh", 45011, count=1)
    summary = json.loads(keeper.run("sweep", "--json").out)
    assert summary["reauth_recorded"] == 0 and summary["transient_failures"] >= 1
    # The pause is shared through the database: the rest of this minute waits.
    assert summary["access_tokens_refreshed"] + summary["transient_failures"] <= 10
    assert keeper.run("reauth").out == ""
