"""Shared fixtures: databases (SQLite and PostgreSQL), the simulator, the keeper program."""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, make_url, select, text, update

from keeper.crypto import Cipher
from keeper.store.grants import Store
from keeper.store.schema import grants, webhooks
from keeper.wechat.simulator import Simulator

#: The server's `test` database; each test run works in a database of its own created there,
#: so two runs on one machine (a developer's and CI's) never drop each other's tables.
PG_SERVER = os.environ.get("KEEPER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = bool(os.environ.get("CI"))
APPID = "wx00000000000000a1"
SECRET = "sim-app-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
#: The token key of store tests (a fresh one per run); e2e tests write theirs to keeper.key.
TEST_CIPHER = Cipher([Fernet.generate_key()])


# -- test tiers ------------------------------------------------------------------------------
#
# `make test-fast` runs the tests with none of these marks: no child process, no PostgreSQL, no
# browser, no network namespace, nothing slow. `make test` runs them all. A test gets its marks
# from its directory, from the fixtures it uses (a PostgreSQL parameter: db; the `keeper`
# fixture, which runs the program: e2e) or from its own `pytest.mark`; `_tier_guard` keeps
# the marks honest.

#: Marks of the tiers beyond the fast one.
TIERS = ("db", "e2e", "hosts", "browser", "slow")
#: Directories whose every test belongs to a tier.
DIRECTORY_TIERS = {"e2e": ("e2e",), "hosts": ("hosts", "slow"), "bench": ("e2e", "slow")}
#: Fixtures that start the real program.
PROGRAM_FIXTURES = ("keeper", "served", "cluster", "testnet")


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in (
        ("db", "opens PostgreSQL"),
        ("e2e", "starts a child process (the keeper program, a tool)"),
        ("hosts", "builds test hosts in network namespaces"),
        ("browser", "drives headless Chromium"),
        ("slow", "takes many seconds by design (leases lapsing, benchmarks)"),
    ):
        config.addinivalue_line("markers", f"{name}: {meaning}; not in `make test-fast`")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(ROOT / "tests").parts
        marks = set(DIRECTORY_TIERS.get(parts[0], ())) if len(parts) > 1 else set()
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "postgresql" in params.values():
            marks.add("db")
        if set(PROGRAM_FIXTURES) & set(getattr(item, "fixturenames", ())):
            marks.add("e2e")
        for mark in sorted(marks):
            item.add_marker(mark)
        # Under pytest-xdist (--dist loadgroup): the test hosts and the benchmarks run one
        # after another (each host or bench already takes processes of its own, and the
        # benchmarks' tests look for what their runs leave behind, which another run beside
        # them would make); a browser module's tests share the stack its module-scoped
        # fixtures start.
        if item.get_closest_marker("hosts") or parts[0] == "bench":
            _group(config, item, "hosts")
        elif item.get_closest_marker("browser"):
            _group(config, item, item.path.stem)


def _group(config: pytest.Config, item: pytest.Item, name: str) -> None:
    """Send ``item`` to the worker of group ``name``. pytest-xdist (3.8) groups by the suffix
    ``@name`` on a node id, which it sets on ``Node._nodeid``; pytest 9.2 keeps node ids in
    ``Node._id``, so that suffix never reached the scheduler and groups ran side by side. The
    id is set here, once; xdist's own attempt after it changes nothing."""
    item.add_marker(pytest.mark.xdist_group(name))
    if getattr(config.option, "loadgroup", False) and "@" not in item.nodeid:
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(f"{item.nodeid}@{name}")  # type: ignore[attr-defined]


class TierViolation(AssertionError):
    """A test of the fast tier started a child process or opened PostgreSQL."""


@contextlib.contextmanager
def _fast_tier_only(item: pytest.Item) -> Iterator[None]:
    """For an item without a tier mark: starting a child process or connecting to PostgreSQL
    fails it, naming the mark it needs, so the fast tier stays fast."""
    if any(item.get_closest_marker(t) for t in TIERS):
        yield
        return
    import psycopg

    def no_child(*args: Any, **kwargs: Any) -> Any:
        raise TierViolation(f"{item.nodeid} starts a child process: mark it e2e "
                            "(or slow, hosts, browser)")

    def no_postgres(*args: Any, **kwargs: Any) -> Any:
        raise TierViolation(f"{item.nodeid} opens PostgreSQL: mark it db")

    patch = pytest.MonkeyPatch()
    patch.setattr(subprocess.Popen, "_execute_child", no_child)
    patch.setattr(psycopg, "connect", no_postgres)  # what SQLAlchemy calls
    patch.setattr(psycopg.Connection, "connect", classmethod(no_postgres))
    patch.setattr(psycopg.AsyncConnection, "connect", classmethod(no_postgres))
    try:
        yield
    finally:
        patch.undo()


# Around set-up (module- and session-scoped fixtures included) and the test itself.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _fast_tier_only(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _fast_tier_only(item):
        return (yield)


_PG_STATE: dict[str, str | None] = {}


def _create_run_database() -> str:
    """Create this run's database on the server; its URL."""
    name = f"keeper_test_{os.getpid()}_{secrets.token_hex(3)}"
    server = make_url(PG_SERVER)
    engine = create_engine(server, isolation_level="AUTOCOMMIT",
                           connect_args={"connect_timeout": 3})
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    atexit.register(_drop_run_database, name)
    return server.set(database=name).render_as_string(hide_password=False)


def _drop_run_database(name: str) -> None:
    engine = create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    with contextlib.suppress(Exception), engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def unavailable(message: str) -> NoReturn:
    """A component a test needs is not reachable: skipped with ``message`` as the visible
    reason on a plain machine, a failure when CI is set (where every component must be)."""
    if IN_CI:
        pytest.fail(message + " (required when CI is set)")
    pytest.skip(message)


def require_postgres() -> str:
    """This run's PostgreSQL URL. Skips with a visible reason when the server is unreachable;
    fails when CI is set."""
    if "url" not in _PG_STATE:
        try:
            _PG_STATE["url"], _PG_STATE["error"] = _create_run_database(), None
        except TierViolation:
            raise
        except Exception as e:  # any failure means: not usable here
            _PG_STATE["url"] = None
            _PG_STATE["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    url, error = _PG_STATE["url"], _PG_STATE["error"]
    if url is None:
        message = f"PostgreSQL at {make_url(PG_SERVER).render_as_string()} is not usable: {error}"
        unavailable(message)
    return url


def reset_postgres() -> None:
    engine = create_engine(require_postgres())
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each supported kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keeper.db'}"
    url = require_postgres()
    reset_postgres()
    return url


@pytest.fixture
def migrated_url(db_url: str) -> str:
    """A database of each kind with the schema in place (as `keeper db upgrade` leaves it)."""
    from keeper.store import db

    engine = db.make_engine(db_url)
    db.upgrade(engine)
    engine.dispose()
    return db_url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url, cipher=TEST_CIPHER, auto_upgrade=True).open()
    yield s
    s.close()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = Simulator(timeout_sleep_s=1.0, seed=7)
    s.add_app(APPID, SECRET)
    s.start()
    yield s
    s.stop()


# -- running the real program -----------------------------------------------------------------


@dataclass
class Outputs:
    """Everything every keeper process printed during the test session (for the leak test)."""

    texts: list[str] = field(default_factory=list)


OUTPUTS = Outputs()


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.err.splitlines() if line.startswith("{")]

    def events(self) -> list[str]:
        return [e["event"] for e in self.logs()]


@dataclass
class Keeper:
    """Runs ``keeper`` as a subprocess with a config file written for the test."""

    workdir: Path
    config: Path
    env: dict[str, str]

    def write_config(self, body: str) -> None:
        self.config.write_text(body)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "keeper", "--config", str(self.config), *args]

    def run(self, *args: str, stdin: str | None = None, timeout: float = 60) -> Ran:
        proc = subprocess.run(
            self.argv(*args), input=stdin, capture_output=True, text=True, cwd=self.workdir,
            env=self.env, timeout=timeout, check=False,
        )
        OUTPUTS.texts.extend([proc.stdout, proc.stderr])
        return Ran(proc.returncode, proc.stdout, proc.stderr)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=self.workdir, env=self.env,
        )


def config_text(*, db_url: str, api_base: str, extra: str = "", app_extra: str = "",
                read_timeout: float = 0.5, metrics_listen: str = "") -> str:
    """A test's configuration. ``metrics_listen`` is off unless a test asks: `keeper run`s of
    tests running side by side would otherwise all want the default port (the listener has
    tests of its own, tests/service/test_metrics_listener.py)."""
    return f"""
metrics_listen = "{metrics_listen}"
database_url = "{db_url}"
api_base = "{api_base}"
avatar_hosts = ["127.0.0.1"]
workers = 8
sweep_interval = 1
connect_timeout = 1
read_timeout = {read_timeout}
lease = "2m"
log_level = "debug"
encryption_key_file = "keeper.key"
{extra}

[[apps]]
appid = "{APPID}"
secret_env = "KEEPER_TEST_SECRET"
{app_extra}
"""


@pytest.fixture
def keeper(tmp_path: Path, sim: Simulator) -> Keeper:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    env["KEEPER_TEST_SECRET"] = SECRET
    env["PYTHONPATH"] = str(ROOT)
    k = Keeper(tmp_path, tmp_path / "keeper.toml", env)
    (tmp_path / "keeper.key").write_text(Fernet.generate_key().decode() + "\n")
    (tmp_path / "keeper.key").chmod(0o600)
    k.write_config(config_text(db_url=f"sqlite:///{tmp_path / 'keeper.db'}", api_base=sim.url))
    return k


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll a condition that another process makes true (bounded; not a sleep-to-wait)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def pass_lease_time(store: Store, seconds: float) -> None:
    """Let ``seconds`` pass on the database's clock as far as leases go: every lease (grants'
    and webhooks') and every hold on a grant's answer ends that much earlier. Whether a lease
    has lapsed is the database's decision (PostgreSQL's own clock; keeper.store.clock), which
    no ``now`` a test passes can move, so a test makes a lease lapse by moving its end
    instead. (A held grant also falls due by the process's clock: pass a later cutoff.)"""
    step = timedelta(seconds=seconds)
    with store.engine.begin() as conn:
        for table, key, column in ((grants, grants.c.id, grants.c.lease_until),
                                   (grants, grants.c.id, grants.c.held_until),
                                   (webhooks, webhooks.c.key, webhooks.c.lease_until)):
            rows = conn.execute(select(key, column).where(column.is_not(None))).all()
            for k, until in rows:
                conn.execute(update(table).where(key == k).values({column: until - step}))


#: libfaketime for threaded programs (Debian's `faketime` package).
FAKETIME_MT = next(iter(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")), None)


def clock_offset_env(offset_s: float) -> dict[str, str]:
    """The environment that sets a program's clock ``offset_s`` ahead (negative: behind) by
    libfaketime, its monotonic clocks left alone (faked ones hang timed waits; see
    docs/explanation/faults.md). Skipped with the reason where libfaketime is not installed; a
    failure when CI is set."""
    if FAKETIME_MT is None:
        message = "libfaketime is not installed (Debian's `faketime` package)"
        unavailable(message)
    return {"LD_PRELOAD": FAKETIME_MT, "FAKETIME": f"{offset_s:+g}s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
