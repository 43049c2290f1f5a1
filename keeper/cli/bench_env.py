"""Throwaway resources for the benchmarks: a child process in a session of its own, and a
database of its own (a SQLite file, or a PostgreSQL database dropped at the end)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import create_engine, make_url, text


class Child:
    """A process in a session of its own (Ctrl-C reaches only the bench), logging to a file."""

    def __init__(self, argv: list[str], log: Path, **kw: Any) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log,
                                     start_new_session=True, **kw)

    def cpu_s(self) -> float:
        """CPU seconds of the process and its children (uvicorn's server processes)."""
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(self.proc.pid)
            return sum(sum(p.cpu_times()[:2]) for p in [top, *top.children(recursive=True)])
        return 0.0

    def stop(self, timeout_s: float = 15) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def database(kind: str, server: str, workdir: Path) -> Iterator[str]:
    """A database of our own: a SQLite file, or a PostgreSQL database dropped at the end."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    name = f"keeper_bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with contextlib.suppress(Exception), admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
