"""The example website (examples/website/) in a real browser, against the real `keeper serve`
and the simulator's WeChat login page: from the "Log in with WeChat" click to the profile page
with the nickname and the avatar keeper kept, and the site's pages for what can go wrong.

Given the simulator, `keeper serve` (a subprocess, SQLite) with a key of scopes grants and read
made by `keeper api-key`, and the Flask site in a thread (werkzeug's server); when headless
chromium logs in, confirms on the simulator's page and `keeper sweep` reads the profile; then
the page shows the nickname and the avatar whose bytes are the ones keeper kept.

One stack serves the whole module: starting `keeper serve` and chromium costs seconds, each
test a page or two. Each test starts with no cookies and counts the simulator's calls itself.

Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`; `.ci/run`
installs them) are driven by selenium with the driver's path given, so Selenium Manager never
downloads anything. Without them the tests are skipped with the reason; they fail when CI is set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

from keeper.wechat.simulator import SIM_USERS, Simulator, openid_for
from tests.api.server import free_port, stop, wait_healthy
from tests.conftest import APPID, ROOT, SECRET, Keeper, config_text, unavailable

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 10.0  # the longest a page or a process may take to show up


def require_chromium() -> None:
    """Skips with a visible reason when Debian's chromium or chromedriver is missing; fails
    when CI is set (.ci/run installs them)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver"
        unavailable(message)


@dataclass
class Stack:
    """What the browser meets: WeChat (the simulator), keeper and its API, the site."""

    sim: Simulator
    keeper: Keeper
    api: str
    key: str
    site: str
    browser: WebDriver

    def profile(self, openid: str) -> dict[str, Any]:
        """The user's document from the API, as the site reads it."""
        answer = requests.get(f"{self.api}/v1/apps/{APPID}/users/{openid}", timeout=5,
                              headers={"Authorization": f"Bearer {self.key}"})
        assert answer.status_code == 200, answer.text
        document: dict[str, Any] = answer.json()
        return document

    def codes(self) -> list[str]:
        """Every login code the simulator issued."""
        with self.sim._lock:
            return list(self.sim._codes)

    def code_calls(self) -> int:
        return int(self.sim.stats()["endpoints"]["code"]["calls"])  # type: ignore[index]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The simulator, `keeper serve`, the site and chromium, for the module (made as the
    ``sim`` and ``keeper`` fixtures of tests/conftest.py make theirs, once). `keeper api-key`
    runs while chromium starts: each takes about two seconds."""
    require_chromium()  # before paying for the rest
    with ExitStack() as resources:
        sim = Simulator(timeout_sleep_s=1.0, seed=7)
        sim.add_app(APPID, SECRET)
        sim.start()
        resources.callback(sim.stop)
        keeper = make_keeper(tmp_path_factory.mktemp("example-site"), sim)
        making = keeper.start("api-key", "--name", "site", "--scopes", "grants,read", "--json")
        resources.callback(stop, making)  # only if chromium fails to start: it ends by itself
        browser = resources.enter_context(chromium())
        made, err = making.communicate(timeout=WAIT_S)
        assert making.returncode == 0, err
        key = json.loads(made)
        with (keeper.workdir / "api-keys").open("a") as keys:
            keys.write(key["line"] + "\n")
        api = resources.enter_context(keeper_serve(keeper, sim, key["key"]))
        site = resources.enter_context(example_site(sim, api, key["key"]))
        yield Stack(sim, keeper, api, key["key"], site, browser)


def make_keeper(workdir: Path, sim: Simulator) -> Keeper:
    """A keeper working in ``workdir`` against the simulator, on SQLite, with an ``[api]``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    env.update(KEEPER_TEST_SECRET=SECRET, PYTHONPATH=str(ROOT))
    keeper = Keeper(workdir, workdir / "keeper.toml", env)
    (workdir / "keeper.key").write_text(Fernet.generate_key().decode() + "\n")
    (workdir / "keeper.key").chmod(0o600)
    keeper.write_config(config_text(
        db_url=f"sqlite:///{workdir / 'keeper.db'}", api_base=sim.url,
        extra=f'[api]\nlisten = "127.0.0.1:{free_port()}"\nkeys_file = "api-keys"\n'))
    return keeper


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """Headless chromium through Debian's chromedriver (no Selenium Manager)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)),
                              options=options)
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


@contextmanager
def keeper_serve(keeper: Keeper, sim: Simulator, key: str) -> Iterator[str]:
    """`keeper serve`: its URL, once /healthz answers 200. Stopped with SIGTERM; its logs must
    hold neither the key nor a login code."""
    listen = re.search(r'listen = "([^"]+)"', keeper.config.read_text())
    assert listen is not None
    url = f"http://{listen[1]}"
    proc = keeper.start("serve")
    try:
        wait_healthy(url, proc, timeout=WAIT_S)
        yield url
    finally:
        _, logged = stop(proc)
    assert key not in logged
    with sim._lock:
        assert all(code not in logged for code in sim._codes)


@contextmanager
def example_site(sim: Simulator, api: str, key: str) -> Iterator[str]:
    """examples/website/app.py in a thread, configured as its README says: its URL."""
    spec = importlib.util.spec_from_file_location("example_site",
                                                  ROOT / "examples" / "website" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.create_app({"KEEPER_API": api, "KEEPER_API_KEY": key, "WECHAT_APPID": APPID,
                             "WECHAT_OPEN_BASE": sim.url, "SECRET_KEY": secrets.token_hex(16)})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="example-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture
def page(stack: Stack, caplog: pytest.LogCaptureFixture) -> WebDriver:
    """The browser on the site's home page, with no cookie of an earlier test; the site's logs
    (its access log included) are captured, to check what they do not say."""
    caplog.set_level(logging.INFO)
    stack.browser.delete_all_cookies()
    stack.browser.get(stack.site)
    return stack.browser


def shown(browser: WebDriver, element_id: str) -> str:
    """The element's text once it is on the page (waits for redirects to land)."""
    element = WebDriverWait(browser, WAIT_S).until(
        expected_conditions.presence_of_element_located((By.ID, element_id)))
    return str(element.text)


def log_in(browser: WebDriver, *, button: str = "confirm") -> None:
    """Click "Log in with WeChat", then the simulator page's button."""
    browser.find_element(By.ID, "login").click()
    WebDriverWait(browser, WAIT_S).until(
        expected_conditions.element_to_be_clickable((By.ID, button))).click()


def assert_nothing_leaked(stack: Stack, browser: WebDriver,
                          caplog: pytest.LogCaptureFixture) -> None:
    """No login code or API key in the site's logs or on its page."""
    seen = caplog.text + browser.page_source
    assert stack.key not in seen
    assert all(code not in seen for code in stack.codes())


def test_a_login_shows_the_nickname_and_the_avatar_keeper_kept(
        stack: Stack, page: WebDriver, caplog: pytest.LogCaptureFixture) -> None:
    log_in(page)
    assert "keeper has not read your profile yet" in shown(page, "pending")
    swept = stack.keeper.run("sweep", "--json")
    assert swept.code == 0, swept.err
    summary = json.loads(swept.out)
    assert summary["profiles_fetched"] == 1 and summary["avatars_saved"] == 1
    page.refresh()
    assert shown(page, "nickname") == SIM_USERS[0].nickname
    width = WebDriverWait(page, WAIT_S).until(lambda b: b.execute_script(
        "const img = document.getElementById('avatar');"
        "return img.complete && img.naturalWidth;"))
    assert width == 640  # keeper keeps the largest size WeChat has (the URL's /0)
    # The bytes the browser gets from the site's /avatar (its session cookie, no key).
    digest = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/avatar').then(r => r.arrayBuffer()).then(b => crypto.subtle.digest('SHA-256', b))"
        ".then(h => done(Array.from(new Uint8Array(h))"
        "  .map(x => x.toString(16).padStart(2, '0')).join('')));")
    profile = stack.profile(openid_for(APPID, SIM_USERS[0].key))
    assert digest == profile["avatar_sha256"]
    revalidated = page.execute_async_script(  # keeper's ETag and 304 pass through the site
        "const done = arguments[arguments.length - 1];"
        "fetch('/avatar', {cache: 'no-store', headers: {'If-None-Match': arguments[0]}})"
        ".then(r => done(r.status));", f'"{digest}"')
    assert revalidated == 304
    original = re.sub(r"/\d+$", "/0", profile["avatar_url"])
    kept = requests.get(original, timeout=5).content  # WeChat's image, kept verbatim
    assert hashlib.sha256(kept).hexdigest() == digest
    assert_nothing_leaked(stack, page, caplog)


def test_a_code_wechat_refuses_asks_the_user_to_log_in_again(
        stack: Stack, page: WebDriver, caplog: pytest.LogCaptureFixture) -> None:
    stack.sim.force("code", 40029)
    log_in(page)
    assert shown(page, "message") == "That login did not work: please log in again."
    assert page.find_element(By.ID, "login").is_displayed()  # and offers the button again
    assert_nothing_leaked(stack, page, caplog)


def test_wechat_down_at_the_callback_asks_the_user_to_try_again(
        stack: Stack, page: WebDriver, caplog: pytest.LogCaptureFixture) -> None:
    stack.sim.force("code", -1)
    log_in(page)
    assert shown(page, "message") == "WeChat is not answering right now: try again in a minute."
    assert_nothing_leaked(stack, page, caplog)


def test_a_denied_login_says_so_and_exchanges_nothing(stack: Stack, page: WebDriver) -> None:
    before = stack.code_calls()
    log_in(page, button="deny")
    assert shown(page, "message") == "You cancelled the login."
    assert stack.code_calls() == before


def test_a_callback_with_a_forged_state_is_refused_before_keeper_is_called(
        stack: Stack, page: WebDriver) -> None:
    page.find_element(By.ID, "login").click()  # the session holds a state now
    code = stack.sim.issue_code(appid=APPID, openid=openid_for(APPID, "jim"))
    before = stack.code_calls()
    page.get(f"{stack.site}/callback?code={code}&state=forged")
    assert shown(page, "message") == "This login link is stale: please log in again."
    assert stack.code_calls() == before
