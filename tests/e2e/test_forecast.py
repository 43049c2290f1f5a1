"""`keeper forecast`: for each of the next N China dates, the live grants whose refresh token's
lifetime ends that day (zeros included), as JSON and as text; dead grants and days outside
the window are left out; a bad --days is refused."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from keeper.wechat.simulator import Simulator
from tests.conftest import Keeper
from tests.e2e.helpers import DAY, make_grant, seed

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_forecast_counts_live_grants_by_the_china_date_their_lifetime_ends(
    sim: Simulator, keeper: Keeper
) -> None:
    now = time.time()
    ages = {f"u{i}": 1.25 + (i % 9) * 2.5 for i in range(40)}  # lifetimes end 1.6 to 28.8 d on
    ages["old"] = 29.7  # refreshed by the sweep below: WeChat keeps its token, so it lapses
    grants = [make_grant(o, issued_days_ago=a, scope="snsapi_base", now=now)
              for o, a in ages.items()]
    grants.append(make_grant("dead", issued_days_ago=20, state="revoked", access_in_s=-60,
                             now=now))
    seed(sim, keeper, grants)
    assert keeper.run("sweep").code == 0  # dead -> reauth, old -> expiring
    # Expected, computed apart from keeper: the Shanghai date of issued + 30 days.
    lapse = Counter(
        datetime.fromtimestamp(now - a * DAY + 30 * DAY, UTC).astimezone(SHANGHAI).date()
        for a in ages.values())
    today = datetime.fromtimestamp(time.time(), SHANGHAI).date()
    ran = keeper.run("forecast", "--json")
    assert ran.code == 0, ran.err
    days = json.loads(ran.out)["days"]
    assert [d["date"] for d in days] == [(today + timedelta(days=i)).isoformat()
                                         for i in range(30)]
    assert {d["date"]: d["lapsing"] for d in days} == {
        (today + timedelta(days=i)).isoformat(): lapse[today + timedelta(days=i)]
        for i in range(30)}
    assert sum(d["lapsing"] for d in days) == len(ages)  # dead is not counted
    old_day = datetime.fromtimestamp(now + 0.3 * DAY, UTC).astimezone(SHANGHAI).date()
    assert {d["date"]: d["expiring"] for d in days if d["expiring"]} == {
        old_day.isoformat(): 1}

    week = json.loads(keeper.run("forecast", "--days", "7", "--json").out)["days"]
    assert week == days[:7]
    text = keeper.run("forecast", "--days", "7")
    assert text.code == 0
    rows = [line.split() for line in text.out.splitlines()[1:-1]]
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [
        (d["date"], d["lapsing"], d["expiring"]) for d in week]
    assert text.out.splitlines()[-1].split()[1] == str(sum(d["lapsing"] for d in week))


def test_a_bad_number_of_days_is_refused(keeper: Keeper) -> None:
    for bad in ("0", "3651", "-2"):
        ran = keeper.run("forecast", "--days", bad)
        assert ran.code == 2 and "--days" in ran.err
