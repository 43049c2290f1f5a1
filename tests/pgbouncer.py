"""A PgBouncer of the test's own (Debian's ``pgbouncer``), in transaction pooling mode, in
front of the test PostgreSQL: its config generated in a directory of its own, listening on one
address and a free port, started in the foreground and stopped at the end. The distribution's
service (if any) is never used.

PgBouncer refuses to run as root: as root it is started with ``-u postgres``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy import make_url

from tests.conftest import PG_SERVER, unavailable

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class PgBouncer:
    """One PgBouncer on ``host``: :meth:`up`, :meth:`url` of a database through it,
    :meth:`down`."""

    def __init__(self, host: str = "127.0.0.1", pool_size: int = 20) -> None:
        self.host = host
        self.pool_size = pool_size
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="keeper-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None
        server = make_url(PG_SERVER)
        self.user = server.username or "postgres"
        self._server = (server.host or "127.0.0.1", server.port or 5432)

    def up(self) -> PgBouncer:
        """Start it (skipped with a visible reason where PgBouncer is not installed; a failure
        when CI is set)."""
        if not os.path.exists(PGBOUNCER):
            message = "PgBouncer is not installed (Debian's `pgbouncer` package)"
            unavailable(message)
        self.port = _free_port(self.host)
        (self.dir / "users.txt").write_text(f'"{self.user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={self._server[0]} port={self._server[1]}

[pgbouncer]
listen_addr = {self.host}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
admin_users = {self.user}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 1000
logfile = {self.dir}/pgbouncer.log
pidfile =
""")
        argv = [PGBOUNCER, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            for f in self.dir.iterdir():
                os.chown(f, pw.pw_uid, pw.pw_gid)
            argv[1:1] = ["-u", "postgres"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:  # until it accepts connections (bounded)
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.down()
                    raise RuntimeError(f"PgBouncer did not start: {err}{self.log()}") from None
                time.sleep(0.05)

    def url(self, db_url: str) -> str:
        """``db_url``'s database, reached through this PgBouncer."""
        return make_url(db_url).set(host=self.host, port=self.port).render_as_string(
            hide_password=False)

    def log(self) -> str:
        try:
            return (self.dir / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return ""

    def stats(self, database: str) -> dict[str, int]:
        """PgBouncer's ``SHOW STATS`` row of ``database`` (its admin console)."""
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.user,
                             dbname="pgbouncer", autocommit=True,
                             prepare_threshold=None) as conn:
            cur = conn.execute("SHOW STATS")
            names = [c.name for c in cur.description or []]
            for row in cur.fetchall():
                found = dict(zip(names, row, strict=True))
                if found["database"] == database:
                    return {k: int(v) for k, v in found.items()
                            if k != "database" and str(v).isdigit()}
        return {}

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
