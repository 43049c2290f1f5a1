"""The documentation's snippets, run as a reader runs them: each block marked
``<!-- snippet: NAME -->`` (tests/docs/snippets.py) is written to a file as it stands and run
by its interpreter (``sh``, ``bash``, ``python``, ``node``, ``php``) against a real ``keeper
serve`` and the WeChat simulator, its placeholders filled through the environment it reads
(``KEEPER_URL``, ``KEEPER_KEY``, ``APPID``, ``CODE``, ``OPENID``, ``KEEPER_WEBHOOK_SECRET``,
``PORT``). Then what it printed, and what keeper and the simulator saw, are checked.

Node and PHP come from the system (Debian's ``nodejs`` and ``php-cli``, which ``.ci/run``
installs): without them their tests are skipped with the reason, and fail when CI is set."""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import requests

from keeper.events.signing import sign
from keeper.wechat.simulator import Simulator
from tests.api.server import Served, free_port, serving
from tests.conftest import APPID, Keeper, config_text, unavailable, wait_for
from tests.docs.snippets import Block, snippet
from tests.e2e.helpers import make_grant, seed

# About 45 s in all (ten tests of 1 to 7 s, each starting keeper and a program or two).
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

PNG = b"\x89PNG\r\n\x1a\n"
HOOK_SECRET = "whsec-snippets-4d1f8a"
#: The file each language's snippet is saved as, and how it is run.
FILES = {"sh": "keeper.sh", "bash": "keeper.sh", "python": "snippet.py", "js": "snippet.js",
         "php": "snippet.php"}


@functools.cache
def _look_up(name: str, version_at_least: int | None) -> tuple[str | None, str | None]:
    """(the program's path, or None with the reason it cannot be used)."""
    path = shutil.which(name)
    if path is None:
        return None, f"`{name}` is not installed"
    if version_at_least is not None:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             check=False).stdout
        major = re.search(r"(\d+)\.", out)
        if not major or int(major[1]) < version_at_least:
            return None, f"`{name}` {out.strip()!r} is older than {version_at_least}"
    return path, None


def tool(name: str, *, version_at_least: int | None = None) -> str:
    """The path of a program the snippets need from the system. Without it (or with a major
    version below ``version_at_least``): skipped with the reason; a failure when CI is set."""
    path, problem = _look_up(name, version_at_least)
    if path is None:
        message = f"{problem} (Debian: nodejs, php-cli; .ci/run installs them)"
        unavailable(message)
    return path


def interpreter(block: Block) -> list[str]:
    if block.lang == "python":
        return [sys.executable]  # the venv's: requests and Flask, as a reader pip-installs
    if block.lang == "js":
        return [tool("node", version_at_least=18)]  # fetch is built in from 18 on
    if block.lang == "php":
        return [tool("php", version_at_least=8)]
    return [block.lang]  # sh, bash


def reader_env(served: Served | None = None, **values: str) -> dict[str, str]:
    """The environment of a reader's terminal: none of the tests' own KEEPER_ variables, the
    venv's python3 first on PATH, and what the snippet reads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if served is not None:
        env.update(KEEPER_URL=served.base, KEEPER_KEY=served.keys["all"], APPID=APPID)
    env.update(values)
    return env


def save(block: Block, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / FILES[block.lang]
    path.write_text(block.body)
    return path


def run(block: Block, where: Path, env: dict[str, str], *args: str,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    path = save(block, where)
    return subprocess.run([*interpreter(block), str(path), *args], cwd=where, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def needs_nothing_more(block: Block) -> Block:
    """The block, checked to need nothing beyond what its page says: Node's own modules (no
    package), PHP's command line without the curl extension (Debian's php-cli)."""
    if block.lang == "js":
        assert not re.search(r"\b(require\(|from\s*)[\"'](?!node:)", block.body), block.where
    if block.lang == "php":
        assert "curl_" not in block.body, block.where
    return block


def answers(out: str) -> list[Any]:
    """The JSON documents a curl snippet printed, one a line (other lines as they are)."""
    found: list[Any] = []
    for line in out.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            found.append(line)
    return found


@pytest.fixture
def api(keeper: Keeper, sim: Simulator) -> Iterator[Served]:
    """``keeper serve`` on SQLite against the simulator; profiles read at every sweep, so one
    sweep keeps a new user's avatar."""
    with serving(keeper, db_url=f"sqlite:///{keeper.workdir / 'keeper.db'}", api_base=sim.url,
                 extra="profile_interval = 0") as s:
        yield s


def log_in(served: Served, sim: Simulator, openid: str) -> None:
    code = sim.issue_code(appid=APPID, openid=openid)
    r = served.call("POST", "/v1/grants", json={"appid": APPID, "code": code})
    assert r.status_code == 201, r.text


def sweep(keeper: Keeper) -> None:
    ran = keeper.run("sweep")
    assert ran.code == 0, ran.err


# -- README.md, docs/guides/login.md, docs/guides/tokens.md: single requests with curl --------


def test_readme_main_case_logs_in_and_takes_a_token(
    api: Served, sim: Simulator, tmp_path: Path,
) -> None:
    code = sim.issue_code(appid=APPID, openid="o-readme")
    ran = run(snippet("readme-curl"), tmp_path,
              reader_env(api, CODE=code, OPENID="o-readme"))
    assert ran.returncode == 0 and ran.stderr == "", ran
    login, token = answers(ran.stdout)
    assert login["openid"] == "o-readme" and login["scope"] == "snsapi_login"
    assert token["access_token"] == sim.current_tokens()["o-readme"][0]


def test_login_and_tokens_pages_log_in_take_a_token_the_feed_and_the_avatar(
    api: Served, sim: Simulator, keeper: Keeper, tmp_path: Path,
) -> None:
    code = sim.issue_code(appid=APPID, openid="o-guide")
    env = reader_env(api, CODE=code, OPENID="o-guide")
    ran = run(snippet("login-curl"), tmp_path / "login", env)
    assert answers(ran.stdout)[0]["openid"] == "o-guide", ran

    ran = run(snippet("tokens-token"), tmp_path / "token", env)
    assert answers(ran.stdout)[0]["access_token"] == sim.current_tokens()["o-guide"][0], ran

    # Before the sweep keeper holds no avatar: the page's avatar lines print keeper's error.
    ran = run(snippet("tokens-avatar"), tmp_path / "early", env)
    assert answers(ran.stdout)[0]["error"] == "no_avatar", ran
    assert sorted(p.name for p in (tmp_path / "early").iterdir()) == ["keeper.sh"]

    # A user WeChat has declared dead, and a sweep: the feed has them, o-guide has an avatar.
    seed(sim, keeper, [make_grant("o-gone", access_in_s=-60, state="invalid")])
    sweep(keeper)
    ran = run(snippet("tokens-reauth"), tmp_path / "reauth", env)
    feed = answers(ran.stdout)[0]
    assert [(u["openid"], u["reason"]) for u in feed["users"]] == [
        ("o-gone", "refresh_token_invalid")], ran

    ran = run(snippet("tokens-avatar"), tmp_path / "avatar", env)
    assert ran.stdout == "saved avatar.png\n", ran
    saved = (tmp_path / "avatar" / "avatar.png").read_bytes()
    assert saved.startswith(PNG)
    profile = api.call("GET", api.user(APPID, "o-guide")).json()
    assert profile["avatar_type"] == "image/png"
    assert hashlib.sha256(saved).hexdigest() == profile["avatar_sha256"]


# -- docs/guides/clients.md --------------------------------------------------------------------


def test_curl_client_logs_in_takes_a_token_the_feed_the_avatar_and_forgets_the_user(
    api: Served, sim: Simulator, keeper: Keeper, tmp_path: Path,
) -> None:
    block = snippet("clients-curl")
    # A returning user: logged in before, and a sweep kept their avatar.
    log_in(api, sim, "o-curl")
    sweep(keeper)
    kept = api.call("GET", api.user(APPID, "o-curl")).json()
    assert kept["avatar_type"] == "image/png"
    code = sim.issue_code(appid=APPID, openid="o-curl")
    ran = run(block, tmp_path / "returning", reader_env(api, CODE=code))
    assert ran.returncode == 0 and ran.stderr == "", ran
    login, token, feed, saved, deleted = answers(ran.stdout)
    assert login["openid"] == "o-curl"
    assert token["access_token"] == sim.current_tokens()["o-curl"][0]
    assert feed["users"] == []
    assert saved == "saved avatar.png" and deleted == 204
    image = (tmp_path / "returning" / "avatar.png").read_bytes()
    assert image.startswith(PNG)
    assert hashlib.sha256(image).hexdigest() == kept["avatar_sha256"]
    assert api.call("GET", api.user(APPID, "o-curl")).json()["error"] == "no_grant"

    # A new user: no avatar before a sweep, and keeper's JSON error says so.
    code = sim.issue_code(appid=APPID, openid="o-new")
    ran = run(block, tmp_path / "new", reader_env(api, CODE=code))
    assert ran.returncode == 0, ran
    assert answers(ran.stdout)[3]["error"] == "no_avatar"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["keeper.sh"]

    # The same code again: WeChat refuses it; the script prints why and stops there.
    ran = run(block, tmp_path / "again", reader_env(api, CODE=code))
    assert ran.returncode == 1, ran
    [refused] = answers(ran.stdout)
    assert refused["error"] == "code_rejected" and refused["errcode"] == 40163


CLIENTS = {"python": "clients-python", "node": "clients-node", "php": "clients-php"}


@pytest.mark.parametrize("language", sorted(CLIENTS))
def test_client_logs_in_takes_a_token_and_tells_log_in_again_from_try_later(
    language: str, api: Served, sim: Simulator, keeper: Keeper, tmp_path: Path,
) -> None:
    block = needs_nothing_more(snippet(CLIENTS[language]))
    env = reader_env(api)

    def client(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
        return run(block, tmp_path, {**env, **more}, *args)

    code = sim.issue_code(appid=APPID, openid="o-client")
    ran = client("login", APPID, code)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "o-client\n", ""), ran
    assert api.call("GET", api.user(APPID, "o-client")).status_code == 200
    ran = client("token", APPID, "o-client")
    assert ran.returncode == 0 and ran.stdout == sim.current_tokens()["o-client"][0] + "\n", ran

    # Log in again: a spent code, a user keeper does not hold, a grant WeChat declared dead,
    # a code WeChat did not answer for (spent all the same).
    ran = client("login", APPID, code)
    assert ran.returncode == 1 and "log in again" in ran.stderr and "40163" in ran.stderr, ran
    ran = client("token", APPID, "o-stranger")
    assert (ran.returncode, ran.stderr) == (1, "log in again: no_grant\n"), ran
    seed(sim, keeper, [make_grant("o-dead", access_in_s=-60, state="invalid"),
                       make_grant("o-later", access_in_s=-60)])
    ran = client("token", APPID, "o-dead")
    assert (ran.returncode, ran.stderr) == (1, "log in again: refresh_token_invalid\n"), ran
    sim.script("o-late", "code", "502")
    ran = client("login", APPID, sim.issue_code(appid=APPID, openid="o-late"))
    assert ran.returncode == 1 and "log in again" in ran.stderr, ran
    assert "did not answer" in ran.stderr, ran

    # Try later: WeChat does not answer the refresh; Retry-After says when.
    sim.script("o-later", "refresh", "502")
    ran = client("token", APPID, "o-later")
    assert ran.returncode == 1 and re.fullmatch(r"try again in \d+ s\n", ran.stderr), ran

    # Any other error: keeper's own words, not a stack trace.
    ran = client("token", APPID, "o-client", KEEPER_KEY="kpr_not-a-key")
    assert ran.returncode == 1 and re.fullmatch(r"keeper: 401 unauthorized: .+\n", ran.stderr), ran


# -- docs/guides/events.md: the webhook receivers ----------------------------------------------


RECEIVERS = {"flask": "events-receiver-flask", "node": "events-receiver-node",
             "php": "events-receiver-php"}


@contextmanager
def receiving(language: str, where: Path) -> Iterator[tuple[int, Path]]:
    """The receiver of that language, running as its page says, on a free port: (its port,
    the file its output goes to)."""
    block = needs_nothing_more(snippet(RECEIVERS[language]))
    port = free_port()
    path = save(block, where)
    argv = [*interpreter(block), str(path)]
    if language == "php":  # `php -S 127.0.0.1:PORT receiver.php`, as the snippet says
        argv = [argv[0], "-S", f"127.0.0.1:{port}", str(path)]
    log = where / "output"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=where, stdout=out, stderr=subprocess.STDOUT,
                                env=reader_env(KEEPER_WEBHOOK_SECRET=HOOK_SECRET,
                                               PORT=str(port), TMPDIR=str(where)))
    try:
        def listening() -> bool:
            assert proc.poll() is None, log.read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=30)
        yield port, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(port: int, body: bytes, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/hooks/keeper", body=body,
                     headers={"Content-Type": "application/json", **headers})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("language", sorted(RECEIVERS))
def test_receiver_takes_keepers_events_once_and_refuses_what_keeper_did_not_sign(
    language: str, sim: Simulator, keeper: Keeper, tmp_path: Path,
) -> None:
    with receiving(language, tmp_path / "receiver") as (port, output):
        keeper.env["KEEPER_HOOK_SECRET"] = HOOK_SECRET
        keeper.write_config(config_text(
            db_url=f"sqlite:///{keeper.workdir / 'keeper.db'}", api_base=sim.url, extra=f"""
[[webhooks]]
url = "http://127.0.0.1:{port}/hooks/keeper"
secret_env = "KEEPER_HOOK_SECRET"
timeout = 5
"""))
        # A new webhook gets what happens from the moment keeper first sees it: a first
        # `keeper events deliver` (nothing to send yet), then two users WeChat declared dead,
        # recorded by a sweep, sent by the next `keeper events deliver`.
        assert keeper.run("events", "deliver").code == 0
        seed(sim, keeper, [make_grant(o, access_in_s=-60, state="invalid")
                           for o in ("o-hook1", "o-hook2")])
        sweep(keeper)
        ran = keeper.run("events", "deliver", "--json")
        assert (ran.code, json.loads(ran.out)["delivered"]) == (0, 2), ran
        events = [json.loads(line) for line in keeper.run("events", "--json").out.splitlines()]
        assert len(events) == 2
        for event in events:
            [delivery] = event["deliveries"]
            assert (delivery["state"], delivery["last_status"]) == ("delivered", 204), event
        # Sent again (as after a lost answer): answered 204, handled once.
        ran = keeper.run("events", "replay", events[0]["id"])
        assert ran.code == 0, ran.err
        ran = keeper.run("events", "deliver", "--json")
        assert (ran.code, json.loads(ran.out)["delivered"]) == (0, 1), ran

        body = json.dumps({"id": "evt_snippettest", "type": "grant.deleted",
                           "created_at": "2026-01-01T00:00:00Z",
                           "data": {"appid": APPID, "openid": "o-direct", "unionid": None},
                           }).encode()
        now = int(time.time())
        refused = {
            "no signature": {},
            "another secret": {"Keeper-Signature": sign("not-the-secret", body, now)},
            "another body": {"Keeper-Signature": sign(HOOK_SECRET, body + b" ", now)},
            "an old t": {"Keeper-Signature": sign(HOOK_SECRET, body, now - 600)},
            "a t ahead": {"Keeper-Signature": sign(HOOK_SECRET, body, now + 600)},
            "no v1": {"Keeper-Signature": f"t={now}"},
            "garbage": {"Keeper-Signature": "t=\u00b2,v1=\u00e9"},
            "empty": {"Keeper-Signature": ""},
        }
        statuses = {why: post(port, body, headers) for why, headers in refused.items()}
        assert statuses == dict.fromkeys(refused, 400)
        signed = {"Keeper-Signature": sign(HOOK_SECRET, body, now),
                  "Keeper-Event-Id": "evt_snippettest"}
        assert post(port, body, signed) == 204

        def printed() -> list[str]:
            return [line for line in output.read_text().splitlines()
                    if re.search(r"\b(reauth\.recorded|grant\.deleted) ", line)]

        wait_for(lambda: len(printed()) >= 3)
    lines = [re.sub(r"^.*?(?=(reauth\.recorded|grant\.deleted) )", "", line)
             for line in printed()]
    assert sorted(lines) == ["grant.deleted o-direct", "reauth.recorded o-hook1",
                             "reauth.recorded o-hook2"], output.read_text()


# -- docs/getting-started.md: the first login through the simulator, three terminals -----------


def rewrite_ports(text: str, ports: dict[str, int]) -> str:
    """The page's fixed ports moved to free ones, so the test runs beside a developer's own
    simulator and keeper; nothing else of the block changes."""
    for fixed, free in ports.items():
        text = text.replace(fixed, str(free))
    return text


@contextmanager
def terminal(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[None]:
    """A long-running block, as in a terminal of its own; its whole process group stopped
    at the end (the shell and the program it started)."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_getting_started_first_login_runs_as_written(tmp_path: Path) -> None:
    ports = {"8700": free_port(), "8790": free_port()}
    blocks = [snippet(n) for n in ("getting-started-simulator", "getting-started-keeper",
                                   "getting-started-login")]
    # The repository root as the page has it: .venv/bin/keeper is this checkout's keeper.
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    launcher = tmp_path / ".venv" / "bin" / "keeper"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m keeper "$@"\n')
    launcher.chmod(0o755)
    root = Path(__file__).resolve().parent.parent.parent
    env = reader_env(PYTHONPATH=str(root))
    base = f"http://127.0.0.1:{ports['8790']}"

    def healthy() -> bool:
        with suppress(requests.RequestException):
            return requests.get(base + "/healthz", timeout=1).status_code == 200
        return False

    with terminal([blocks[0].lang, "-c", rewrite_ports(blocks[0].body, ports)], tmp_path, env,
                  tmp_path / "simulate.log"):
        wait_for(lambda: "url" in (tmp_path / "simulate.log").read_text(), timeout=30)
        with terminal([blocks[1].lang, "-c", rewrite_ports(blocks[1].body, ports)], tmp_path,
                      env, tmp_path / "serve.log"):
            wait_for(healthy, timeout=60)
            third = subprocess.run([blocks[2].lang, "-c", rewrite_ports(blocks[2].body, ports)],
                                   cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=120, check=False)
    assert third.returncode == 0, (third, (tmp_path / "serve.log").read_text())
    out = third.stdout.splitlines()
    assert re.fullmatch(r"http://127\.0\.0\.1:5000/callback\?code=[0-9a-f]+&state=abc123",
                        out[0]), out
    login, token, refused = (json.loads(line) for line in out[1:4])
    openid = re.search(r"^OPENID=(\S+)", blocks[2].body, re.MULTILINE)
    assert openid is not None
    assert login["openid"] == openid[1], "the page's OPENID is the one the simulator gives"
    assert login["scope"] == "snsapi_login"
    assert token["openid"] == openid[1] and token["access_token"]
    assert (refused["error"], refused["errcode"]) == ("code_rejected", 40163)
    profile = json.loads(out[-1])
    assert profile["nickname"] == "李雷"
    assert profile["avatar_path"].endswith(".png") and profile["avatar_type"] == "image/png"


def test_the_simulators_admin_api_example_sets_it_up_and_says_what_a_bad_body_lacks(
        sim: Simulator, tmp_path: Path) -> None:
    block = snippet("simulator-admin")
    ran = run(block, tmp_path, reader_env(SIM=sim.url))
    assert ran.returncode == 0, ran.stderr
    app, code, scripted, bad, stats = answers(ran.stdout)
    assert app == {"ok": True} and scripted == {"ok": True}
    assert set(code) == {"code"}
    assert bad["error"] == "bad_request" and bad["detail"].startswith("grants: required")
    assert stats["codes_issued"] >= 1
    # The code is the user's own, as the app's callback would get it.
    exchanged = requests.get(f"{sim.url}/sns/oauth2/access_token", timeout=5, params={
        "appid": "wx1234567890abcdef", "secret": "s3cret", "code": code["code"],
        "grant_type": "authorization_code"}).json()
    assert exchanged["openid"] == "o-demo"

