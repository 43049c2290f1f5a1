"""`keeper run` as a systemd service: sd_notify, signals, outages, and the unit files."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keeper.api.keys import parse_keys
from keeper.config.api import DEFAULT_KEYS_FILE
from keeper.wechat.simulator import Simulator
from tests.conftest import (
    IN_CI,
    ROOT,
    Keeper,
    config_text,
    require_postgres,
    reset_postgres,
    wait_for,
)
from tests.e2e.helpers import endpoint, make_grant, seed

pytestmark = [pytest.mark.e2e]


class NotifySocket:
    """The socket systemd would listen on: an AF_UNIX datagram socket in a temp dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        """Read datagrams until one contains ``needle``; that message."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} in {self.messages[-5:]}")
            self.sock.settimeout(left)
            message = self.sock.recv(4096).decode()
            self.messages.append(message)
            if needle in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def sweeps_done(keeper: Keeper) -> int:
    db = sqlite3.connect(keeper.workdir / "keeper.db")
    try:
        return int(db.execute("select count(*) from sweeps where finished_at is not null")
                   .fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def start_service(keeper: Keeper, notify: NotifySocket | None = None,
                  watchdog_usec: int = 0) -> tuple[subprocess.Popen[str], Path]:
    env = dict(keeper.env)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    log = keeper.workdir / f"run-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(keeper.argv("run"), stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), text=True, cwd=keeper.workdir, env=env)
    return proc, log


def stop(proc: subprocess.Popen[str], timeout: float = 10) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def slow_interval(keeper: Keeper) -> None:
    keeper.write_config(keeper.config.read_text().replace("sweep_interval = 1",
                                                          "sweep_interval = 3600"))


def test_sd_notify_ready_watchdog_status_and_stopping(
    sim: Simulator, keeper: Keeper, notify: NotifySocket
) -> None:
    seed(sim, keeper, [make_grant("o1", access_in_s=-60, scope="snsapi_base")])
    proc, _ = start_service(keeper, notify, watchdog_usec=400_000)
    try:
        ready = notify.wait_for("READY=1")
        assert f"MAINPID={proc.pid}" in ready
        notify.wait_for("WATCHDOG=1")
        assert "1 access tokens" in notify.wait_for("STATUS=last sweep")
        notify.wait_for("WATCHDOG=1")  # keeps pinging between sweeps
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(timeout=10) == 0 and time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigusr1_sweeps_now(sim: Simulator, keeper: Keeper) -> None:
    slow_interval(keeper)
    proc, _ = start_service(keeper)
    try:
        wait_for(lambda: sweeps_done(keeper) == 1, timeout=20)
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: sweeps_done(keeper) == 2, timeout=20)
    finally:
        assert stop(proc) == 0


def test_sighup_applies_a_new_config_and_refuses_a_bad_one(
    sim: Simulator, keeper: Keeper, notify: NotifySocket
) -> None:
    slow_interval(keeper)
    proc, log = start_service(keeper, notify)
    try:
        notify.wait_for("READY=1")
        wait_for(lambda: sweeps_done(keeper) == 1, timeout=20)
        keeper.write_config(keeper.config.read_text().replace("workers = 8", "workers = 3"))
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        wait_for(lambda: sweeps_done(keeper) == 2, timeout=20)  # a reload sweeps at once
        good = keeper.config.read_text()
        keeper.write_config(good + "\nwrokers = 4\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("reload refused")
        keeper.write_config(good)
        proc.send_signal(signal.SIGUSR1)  # still serving, with the last good configuration
        wait_for(lambda: sweeps_done(keeper) == 3, timeout=20)
    finally:
        assert stop(proc) == 0
    events = [line for line in log.read_text().splitlines() if line.startswith("{")]
    reloaded = [e for e in events if '"config.reloaded"' in e]
    refused = [e for e in events if '"config.reload_refused"' in e]
    assert len(reloaded) == 1 and '"workers": 3' in reloaded[0]
    assert len(refused) == 1 and "wrokers" in refused[0]


def test_sighup_refuses_a_webhook_whose_secret_the_service_cannot_read(
    sim: Simulator, keeper: Keeper, notify: NotifySocket
) -> None:
    """`keeper run` sends events, so it needs every webhook's secret (other commands do not):
    a reload adding a webhook whose secret is not in its environment is refused, naming it,
    as a start would be, and the service goes on with the configuration it has."""
    slow_interval(keeper)
    keeper.env.pop("KEEPER_HOOK_SECRET", None)
    proc, log = start_service(keeper, notify)
    try:
        notify.wait_for("READY=1")
        keeper.write_config(keeper.config.read_text().replace("[[apps]]", (
            '[[webhooks]]\nurl = "https://hooks.example.com/in?token=QSECRET"\n'
            'secret_env = "KEEPER_HOOK_SECRET"\n\n[[apps]]')))
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("reload refused")
        assert keeper.run("status").code == 0  # the same file, for a command that sends nothing
    finally:
        assert stop(proc) == 0
    text = log.read_text()
    refused = [e for e in text.splitlines() if '"config.reload_refused"' in e]
    assert len(refused) == 1 and "webhooks[0].secret_env" in refused[0], text[-2000:]
    assert "KEEPER_HOOK_SECRET is not set or empty" in refused[0] and "QSECRET" not in text


def test_a_second_signal_exits_at_once(sim: Simulator, keeper: Keeper) -> None:
    seed(sim, keeper, [make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                       for i in range(40)])
    sim.configure(latency_s=3.0)
    keeper.write_config(keeper.config.read_text().replace("read_timeout = 0.5",
                                                          "read_timeout = 10"))
    proc, log = start_service(keeper)
    try:
        wait_for(lambda: endpoint(sim, "refresh")["calls"] > 0, timeout=20)
        proc.send_signal(signal.SIGTERM)
        # Two signals sent at once are one to the kernel: wait until the first is handled.
        wait_for(lambda: "keeper.stopping" in log.read_text(), timeout=10)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1


class Proxy:
    """A TCP forwarder on a fixed loopback port that can go down and come back.

    ``host``: the loopback address it listens on (tests/e2e/outage.py gives it one of its own).
    """

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        with socket.socket() as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        if self.listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()


def test_the_service_survives_a_database_outage_and_recovers(
    sim: Simulator, keeper: Keeper, notify: NotifySocket
) -> None:
    url = require_postgres()
    reset_postgres()
    from sqlalchemy import make_url

    parsed = make_url(url)
    proxy = Proxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    proxied = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    keeper.write_config(config_text(db_url=proxied, api_base=sim.url))
    proxy.up()
    assert keeper.run("db", "upgrade").code == 0
    seed(sim, keeper, [make_grant(f"o{i}", access_in_s=-60, scope="snsapi_base")
                       for i in range(5)])
    proxy.down()  # down before the service starts: it must wait, not crash-loop
    proc, log = start_service(keeper, notify)
    try:
        wait_for(lambda: "database.unavailable" in log.read_text(), timeout=20)
        assert proc.poll() is None and not any("READY=1" in m for m in notify.messages)
        proxy.up()
        notify.wait_for("READY=1", timeout=30)
        wait_for(lambda: endpoint(sim, "refresh")["ok"] == 5, timeout=20)
        proxy.down()  # and once more while it runs
        wait_for(lambda: log.read_text().count("database.unavailable") >= 2, timeout=20)
        assert proc.poll() is None
        proxy.up()
        wait_for(lambda: "database.recovered" in log.read_text(), timeout=30)
    finally:
        code = stop(proc)
        proxy.down()
    assert code == 0
    text = log.read_text()
    assert "reauth.recorded" not in text and "Traceback" not in text


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if IN_CI:
            pytest.fail("systemd-analyze is required when CI is set")
        pytest.skip("systemd-analyze is not installed here")
    return tool


UNITS = ["keeper.service", "keeper-sweep.service", "keeper@.service", "keeper-api.service"]


@pytest.mark.parametrize("unit", UNITS)
def test_units_verify_and_expose_at_most_1_5(unit: str, tmp_path: Path) -> None:
    tool = _systemd_analyze()
    # Rendered as `make install-systemd` does, so ExecStart points at this checkout's keeper.
    rendered = tmp_path / unit
    rendered.write_text((ROOT / "systemd" / unit).read_text().replace("/opt/keeper", str(ROOT)))
    verify = subprocess.run([tool, "verify", str(rendered)], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = subprocess.run([tool, "security", "--offline=yes", str(rendered)],
                              capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match is not None, security.stdout[-500:] + security.stderr
    assert float(match.group(1)) <= 1.5


def test_install_systemd_renders_the_units_for_this_checkout(tmp_path: Path) -> None:
    make = shutil.which("make") or "make"
    ran = subprocess.run([make, "-s", "install-systemd", f"DESTDIR={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "MAKEFLAGS": ""})
    assert ran.returncode == 0, ran.stderr
    for unit in UNITS:
        text = (tmp_path / "etc/systemd/system" / unit).read_text()
        assert f"{ROOT}/.venv/bin/keeper" in text and "/opt/keeper" not in text
    assert (tmp_path / "etc/keeper/keeper.toml").exists()
    assert (tmp_path / "etc/keeper/keeper.env").stat().st_mode & 0o077 == 0
    # The API's keys file: root's alone (systemd reads it for LoadCredential=), a valid keys
    # file with no key yet, whose comments name this checkout's `keeper api-key`.
    keys = tmp_path / "etc/keeper/api-keys"
    assert keys.stat().st_mode & 0o077 == 0
    assert parse_keys(keys.read_text(), str(keys)) == []
    assert f"{ROOT}/.venv/bin/keeper api-key" in keys.read_text()


def test_the_api_unit_shares_the_services_user_and_reads_its_keys_as_a_credential() -> None:
    api = (ROOT / "systemd" / "keeper-api.service").read_text()
    service = (ROOT / "systemd" / "keeper.service").read_text()
    for line in ("User=keeper", "DynamicUser=yes", "StateDirectory=keeper",
                 "WorkingDirectory=/var/lib/keeper",
                 "Environment=KEEPER_DATABASE_URL=sqlite:////var/lib/keeper/keeper.db",
                 "LoadCredential=appsecret:/etc/keeper/secrets",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert f"\n{line}\n" in api and f"\n{line}\n" in service, line
    assert "/.venv/bin/keeper --config /etc/keeper/keeper.toml serve\n" in api
    # keys_file's default, "api-keys", is looked up in $CREDENTIALS_DIRECTORY first.
    assert f"\nLoadCredential={DEFAULT_KEYS_FILE}:/etc/keeper/api-keys\n" in api
    assert "\nSupplementaryGroups=keeper-api\nReadWritePaths=-/run/keeper-api\n" in api
    assert "d /run/keeper-api 2770 root keeper-api -" in \
        (ROOT / "systemd" / "keeper.tmpfiles").read_text()
    assert "g keeper-api -" in (ROOT / "systemd" / "keeper.sysusers").read_text()


def test_units_keep_avatars_outside_the_private_state_directory() -> None:
    # /var/lib/private is 0700: a web server can serve avatars only from a directory of their own.
    for unit in UNITS:
        text = (ROOT / "systemd" / unit).read_text()
        assert "\nSupplementaryGroups=keeper-avatars\n" in text
        assert "\nReadWritePaths=/var/lib/keeper-avatars\n" in text
        assert "\nUMask=0027\n" in text
    tmpfiles = (ROOT / "systemd" / "keeper.tmpfiles").read_text()
    assert "d /var/lib/keeper-avatars 2770 root keeper-avatars -" in tmpfiles
    assert "g keeper-avatars -" in (ROOT / "systemd" / "keeper.sysusers").read_text()


FAKE_SYSTEMCTL = """#!/bin/sh
# `systemctl show` of an installed keeper.service (as systemd 252 prints it); any other unit
# is not found.
case "$*" in
  *LoadState*keeper.service) echo loaded; exit 0 ;;
  *LoadState*) echo not-found; exit 0 ;;
esac
if [ "$1" = cat ]; then
  cat <<'CAT'
# /etc/systemd/system/keeper.service
[Service]
LoadCredential=old:/etc/keeper/old
#LoadCredential=commented:/etc/keeper/out
# /etc/systemd/system/keeper.service.d/site.conf
[Service]
LoadCredential=
LoadCredential=appsecret:/etc/keeper/secrets
LoadCredential=keeper.key:/etc/keeper/keeper.key
CAT
  exit 0
fi
cat <<'SHOW'
User=keeper
DynamicUser=yes
Group=
SupplementaryGroups=keeper-avatars
StateDirectory=keeper
StateDirectoryMode=0700
WorkingDirectory=/var/lib/keeper
UMask=0027
Environment=KEEPER_DATABASE_URL=sqlite:////var/lib/keeper/keeper.db "A=b c"
EnvironmentFiles=/etc/keeper/keeper.env (ignore_errors=yes)
EnvironmentFiles=/etc/keeper/more.env (ignore_errors=no)
LoadCredential=[unprintable]
ReadWritePaths=/var/lib/keeper-avatars
SHOW
"""

FAKE_SYSTEMD_RUN = """#!/bin/sh
# Records its arguments, one a line, and exits as the command would have.
for a in "$@"; do printf '%s\\n' "$a"; done > "$(dirname "$0")/run.args"
exit 3
"""


def keeper_ctl(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("systemctl", FAKE_SYSTEMCTL), ("systemd-run", FAKE_SYSTEMD_RUN)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "run.args").unlink(missing_ok=True)
    bash = shutil.which("bash") or "/bin/bash"
    ran = subprocess.run([bash, str(ROOT / "systemd" / "keeper-ctl"), *args],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    recorded = bin_dir / "run.args"
    return ran, recorded.read_text().splitlines() if recorded.exists() else []


def test_keeper_ctl_runs_the_command_with_the_units_user_state_environment_and_credentials(
    tmp_path: Path,
) -> None:
    ran, argv = keeper_ctl(tmp_path, "import", "-", "--odd arg 'quoted' $HOME")
    assert ran.returncode == 3, ran.stderr  # the command's exit status passes through
    assert argv[:5] == ["--quiet", "--wait", "--pipe", "--collect", "--service-type=exec"]
    props = [argv[i + 1] for i, a in enumerate(argv) if a == "-p"]
    assert props == [
        "User=keeper", "DynamicUser=yes", "SupplementaryGroups=keeper-avatars",
        "StateDirectory=keeper", "StateDirectoryMode=0700", "WorkingDirectory=/var/lib/keeper",
        "UMask=0027",
        'Environment=KEEPER_DATABASE_URL=sqlite:////var/lib/keeper/keeper.db "A=b c"',
        "EnvironmentFile=-/etc/keeper/keeper.env", "EnvironmentFile=/etc/keeper/more.env",
        "ReadWritePaths=/var/lib/keeper-avatars",
        "LoadCredential=appsecret:/etc/keeper/secrets",
        "LoadCredential=keeper.key:/etc/keeper/keeper.key",
    ]
    command = argv[argv.index("--") + 1:]
    assert command == ["/opt/keeper/.venv/bin/keeper", "--config", "/etc/keeper/keeper.toml",
                       "import", "-", "--odd arg 'quoted' $HOME"]


@pytest.mark.parametrize("args", [[], ["--unit"], ["--bogus", "status"], ["--unit", "x@1"]])
def test_keeper_ctl_refuses_bad_usage_and_units_that_are_not_installed(
    tmp_path: Path, args: list[str]
) -> None:
    ran, argv = keeper_ctl(tmp_path, *args, *(["status"] if args[:1] == ["--unit"] and
                                              len(args) == 2 else []))
    assert ran.returncode == 2 and argv == []
    assert "keeper-ctl" in ran.stderr


def test_keeper_ctl_passes_shellcheck() -> None:
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed here")
    for script in (ROOT / "systemd" / "keeper-ctl", ROOT / "tests" / "system" / "systemd-check"):
        ran = subprocess.run([tool, str(script)], capture_output=True, text=True, check=False)
        assert ran.returncode == 0, ran.stdout


def test_make_install_is_the_production_venv_and_keeps_the_venvs_pip(tmp_path: Path) -> None:
    make = shutil.which("make") or "make"
    # A dry run in a venv-less copy of the Makefile: what `make install` would run.
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_text("")
    ran = subprocess.run([make, "-n", "install"], cwd=tmp_path, capture_output=True, text=True,
                         check=False, env={**os.environ, "MAKEFLAGS": ""})
    assert ran.returncode == 0, ran.stderr
    assert "-m venv" in ran.stdout and "-c constraints.txt -e ." in ran.stdout
    assert "[test]" not in ran.stdout and "--upgrade pip" not in ran.stdout
    tests = subprocess.run([make, "-n", "test"], cwd=tmp_path, capture_output=True, text=True,
                           check=False, env={**os.environ, "MAKEFLAGS": ""})
    assert "-e '.[test]'" in tests.stdout and "--upgrade pip" not in tests.stdout


def test_readme_and_docs_install_blocks_say_bash_when_they_use_it_and_name_python3_venv() -> None:
    # The install steps moved from the README into the documentation site (docs/): a shell
    # block there that uses bash's own syntax says so; TOML's [[apps]] is not shell.
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text()
        blocks = re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
        for lang, body in blocks:
            if lang in ("", "sh", "bash", "shell") and ("<<<" in body or "[[" in body):
                assert lang == "bash", (page.name, body)
    assert "python3-venv" in (ROOT / "README.md").read_text()
    assert "python3-venv" in (ROOT / "docs" / "operators" / "systemd.md").read_text()
