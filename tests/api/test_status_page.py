"""``GET /status`` in headless Chromium: the page draws one forecast bar per day, its numbers
are `keeper status --json`'s and `keeper forecast --json`'s, and nothing on it is fetched
from elsewhere. The test's screenshot is the one on docs/operators/status-page.md
(``KEEPER_STATUS_SCREENSHOT=PATH`` keeps it; docs/status-page.png is one, committed).

Given users whose refresh tokens end on many of the coming days, some dead, one expiring, and
three sweeps (one with a transient failure), when Chromium opens /status with a read key,
then the charts and tables say what the commands say.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from keeper.wechat.simulator import Simulator
from tests.api.server import Served
from tests.api.test_example_site import WAIT_S, chromium, require_chromium
from tests.conftest import Keeper
from tests.e2e.helpers import make_grant, seed

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

STATUS_KEYS = ("grants", "active", "reauth_required", "refresh_due_24h", "access_expired",
               "retrying", "profiles_failing", "avatars_saved", "events_pending",
               "events_failed")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    require_chromium()
    with chromium() as driver:
        yield driver


def populate(sim: Simulator, keeper: Keeper) -> None:
    """Users lapsing on 28 of the coming days (1 to 7 a day), two dead, one whose refresh token
    WeChat will not renew; three sweeps, the second with one transient failure."""
    grants = [make_grant(f"user-{d:02d}-{n}", issued_days_ago=1.5 + d, scope="snsapi_base")
              for d in range(28) for n in range(1 + (d * 5) % 7)]
    grants += [make_grant("expiring", issued_days_ago=29.2, scope="snsapi_base"),
               make_grant("revoked", access_in_s=-60, state="revoked"),
               make_grant("invalid", issued_days_ago=29.5, state="invalid")]
    seed(sim, keeper, grants)
    for n in range(3):
        if n == 1:
            seed(sim, keeper, [make_grant("stale", access_in_s=-60, scope="snsapi_base")])
            sim.force("refresh", "502")
        ran = keeper.run("sweep", "--json")
        assert ran.code == 0, ran.err


def command(keeper: Keeper, *args: str) -> dict[str, object]:
    ran = keeper.run(*args, "--json")
    assert ran.code == 0, ran.err
    data: dict[str, object] = json.loads(ran.out)
    return data


def number(element_text: str) -> int:
    return int(element_text.replace(",", ""))


def test_the_status_page_in_chromium(served: Served, sim: Simulator, browser: WebDriver,
                                     db_url: str, tmp_path: Path) -> None:
    populate(sim, served.keeper)
    status = command(served.keeper, "status")
    forecast = command(served.keeper, "forecast")
    # The browser sends the read key on every request it makes (there is only the page).
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {
        "headers": {"Authorization": f"Bearer {served.keys['read']}"}})
    browser.set_window_size(1100, 1000)
    browser.get(served.base + "/status")
    WebDriverWait(browser, WAIT_S).until(
        expected_conditions.presence_of_element_located((By.ID, "forecast-chart")))
    assert browser.title == "keeper status"

    bars = browser.find_elements(By.CSS_SELECTOR, "#forecast-chart rect.bar")
    days = forecast["days"]
    assert isinstance(days, list) and len(bars) == len(days) == 30
    drawn = [{"date": b.get_attribute("data-date"), "lapsing": int(b.get_attribute("data-lapsing")
              or -1), "expiring": int(b.get_attribute("data-expiring") or -1)} for b in bars]
    assert drawn == days
    assert sum(d["lapsing"] for d in days) == status["active"]  # all within 30 days
    assert sum(d["expiring"] for d in days) == 1
    assert all(float(b.get_attribute("height") or -1) > 0 for b, d in zip(bars, days, strict=True)
               if d["lapsing"])
    assert number(browser.find_element(By.ID, "forecast-total").text) == sum(
        d["lapsing"] for d in days)

    for key in STATUS_KEYS:
        shown = browser.find_element(By.CSS_SELECTOR, f'.stat[data-key="{key}"] .n').text
        assert number(shown) == status[key], key
    sweep_bars = browser.find_elements(By.CSS_SELECTOR, "#sweep-chart rect.bar")
    assert len(sweep_bars) == 3
    assert [b.get_attribute("data-failures") for b in sweep_bars] == ["0", "1", "0"]
    assert [b.get_attribute("class") for b in sweep_bars][1] == "bar alert"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#sweeps tr[data-sweep]")) == 3
    quota = browser.find_element(By.CSS_SELECTOR, '#quota tr[data-endpoint="refresh"]')
    assert "of 50,000 per 60 s" in quota.text
    # Everything the page is made of came with it: one request, no other resource.
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded == []

    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.set_window_size(1100, height + 120)
    wanted = os.environ.get("KEEPER_STATUS_SCREENSHOT")
    shot = Path(wanted) if wanted and db_url.startswith("sqlite") else tmp_path / "status.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_browser_is_asked_for_the_key_and_may_give_it_as_a_password(served: Served) -> None:
    asked = requests.get(served.base + "/status", timeout=10)
    assert asked.status_code == 401
    assert asked.headers["WWW-Authenticate"].startswith('Basic realm="keeper"')
    assert requests.get(served.base + "/status", timeout=10,
                        auth=("me", served.keys["tokens"])).status_code == 403
    page = requests.get(served.base + "/status", timeout=10, auth=("me", served.keys["read"]))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    # The API's other routes take only a bearer key.
    assert requests.get(served.base + "/metrics", timeout=10,
                        auth=("me", served.keys["read"])).status_code == 401
