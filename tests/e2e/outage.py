"""Real database faults for tests: a connection storm, a held write lock, a silent network.

docs/explanation/faults.md says why each is made this way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

from sqlalchemy import create_engine, make_url, text

from keeper.store.db import is_sqlite, sqlite_path
from tests.conftest import PG_SERVER, unavailable
from tests.service.test_service import Proxy

IP = shutil.which("ip") or "/usr/sbin/ip"


class Outage:
    """The database refuses keeper for ``seconds`` once ``when()`` holds.

    PostgreSQL: the database refuses new connections, and every open one is terminated
    every 0.2 s (a storm of ``pg_terminate_backend``). SQLite: another connection holds the
    write lock, so every write waits out keeper's ``database_timeout`` and fails.
    """

    def __init__(self, url: str, *, seconds: float, when: Callable[[], bool]) -> None:
        self.url = url
        self.seconds = seconds
        self.when = when
        self.started = threading.Event()
        self.done = threading.Event()
        self.kills = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.when():
            if time.monotonic() > deadline:
                self.done.set()
                return
            time.sleep(0.005)
        try:
            if is_sqlite(self.url):
                self._hold_sqlite_lock()
            else:
                self._storm()
        finally:
            self.done.set()

    def _hold_sqlite_lock(self) -> None:
        path = sqlite_path(self.url)
        assert path is not None
        con = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            con.execute("BEGIN EXCLUSIVE")
            self.started.set()
            time.sleep(self.seconds)
            con.execute("ROLLBACK")
        finally:
            con.close()

    def _storm(self) -> None:
        name = make_url(self.url).database
        engine = create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                # New connections are refused for the whole outage (without this, keeper
                # reconnected between two rounds of the storm and wrote its results there,
                # so a test could find nothing held when it stopped keeper).
                conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
                try:
                    self.started.set()
                    end = time.monotonic() + self.seconds
                    while time.monotonic() < end:
                        self.kills += len(conn.execute(text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"),
                            {"db": name}).all())
                        time.sleep(0.2)
                finally:
                    conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        finally:
            engine.dispose()

    def wait(self, timeout: float = 150) -> None:
        assert self.done.wait(timeout), "the outage never ended"
        self._thread.join(timeout)


class SilentProxy(Proxy):
    """The outage proxy on a loopback address of its own, which a blackhole route can cut.

    ``cut()`` adds ``ip route add blackhole ADDR/32 table local``: packets to the address are
    dropped before any kernel acknowledges them, so open connections stall like a real
    partition (keepalives and tcp_user_timeout notice) and new ones fail. The proxy holds bytes
    in the kernel meanwhile, never drops them, so the path works again after ``heal()``. Needs
    root (CAP_NET_ADMIN).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(
            target, host=f"127.123.{os.getpid() % 250}.{int(time.time() * 1000) % 250 + 2}")
        self.is_cut = False
        self.up()

    def _route(self, action: str) -> None:
        subprocess.run([IP, "route", action, "blackhole", f"{self.host}/32", "table", "local"],
                       check=True, capture_output=True)

    def cut(self) -> None:
        self._route("add")
        self.is_cut = True

    def heal(self) -> None:
        if self.is_cut:
            self._route("del")
            self.is_cut = False

    def close(self) -> None:
        self.heal()
        self.down()


def require_blackhole() -> None:
    """Skip with a visible reason where routes cannot be changed (not root); fail under CI."""
    probe = f"127.124.{os.getpid() % 250}.{int(time.time() * 1000) % 250 + 2}/32"  # per run
    try:
        subprocess.run([IP, "route", "add", "blackhole", probe, "table", "local"],
                       check=True, capture_output=True)
        subprocess.run([IP, "route", "del", "blackhole", probe, "table", "local"],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        message = f"cannot add a blackhole route here (needs root and iproute2): {e}"
        unavailable(message)


@contextlib.contextmanager
def silent_proxy(target: tuple[str, int]) -> Iterator[SilentProxy]:
    proxy = SilentProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
