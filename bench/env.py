"""Throwaway resources for the benchmarks: the simulator as a child process, a child process in
a session of its own, and a database of its own (a SQLite file, or a PostgreSQL database dropped
at the end)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import requests
from sqlalchemy import create_engine, make_url, text

from bench.seed import APPID, SECRET


class Sim:
    """The simulator as a child process, driven through its admin API."""

    def __init__(self, latency_ms: float, quota: str | None,
                 apps: list[str] | None = None) -> None:
        argv = [sys.executable, "-m", "keeper.wechat.simulator", "--latency-ms", str(latency_ms)]
        for appid in apps or [APPID]:
            argv += ["--app", f"{appid}={SECRET}"]
        if quota:
            argv += ["--quota", f"refresh={quota}"]
        else:
            argv += ["--quota", "refresh=100000000/minute"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = json.loads(self.proc.stdout.readline())["url"]
        self.http = requests.Session()

    def seed(self, grants: list[dict[str, Any]]) -> None:
        for i in range(0, len(grants), 20000):
            r = self.http.post(f"{self.url}/_sim/grants", json={"grants": grants[i:i + 20000]},
                               timeout=120)
            r.raise_for_status()

    def stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.url}/_sim/stats", timeout=30).json()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


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
        self.terminate()
        self.reap(timeout_s)

    def terminate(self) -> None:
        """SIGTERM to its session; once only (a second SIGTERM makes keeper exit at once)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def reap(self, timeout_s: float) -> None:
        """Wait for it to exit, SIGKILL after ``timeout_s``; close its log."""
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
