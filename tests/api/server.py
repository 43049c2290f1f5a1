"""Running ``keeper serve`` for a test: a config with an ``[api]`` table, keys made by
``keeper api-key``, the server started as a subprocess and awaited on ``/healthz``."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests

from keeper.api.keys import new_key
from keeper.store import db
from tests.conftest import OUTPUTS, Keeper, config_text

#: The keys every served test gets, by name: (scopes).
KEY_SCOPES = {"all": "tokens,grants,read", "tokens": "tokens", "read": "read",
              "grants": "grants"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running ``keeper serve``: its base URL and one key per scope set."""

    base: str
    keys: dict[str, str]
    proc: subprocess.Popen[str]
    keeper: Keeper
    session: requests.Session = field(default_factory=requests.Session)

    def call(self, method: str, path: str, *, key: str | None = "all", timeout: float = 30,
             **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {self.keys[key]}"
        return self.session.request(method, self.base + path, headers=headers,
                                    timeout=timeout, **kwargs)

    def user(self, appid: str, openid: str, tail: str = "") -> str:
        return f"/v1/apps/{appid}/users/{openid}{tail}"


def make_keys(keeper: Keeper, keys_file: str = "api-keys") -> dict[str, str]:
    """One key per entry of KEY_SCOPES, made as `keeper api-key` makes them (in process: the
    command itself is tested on its own)."""
    keys, lines = {}, []
    for name, scopes in KEY_SCOPES.items():
        keys[name], line = new_key(name, scopes)
        lines.append(line)
    (keeper.workdir / keys_file).write_text("\n".join(lines) + "\n")
    return keys


#: Servers whose stderr a thread reads as it comes, by pid: a pipe nobody reads fills after
#: ~64 KiB of log lines, and the server then blocks mid-request writing its access log.
_DRAINED: dict[int, tuple[threading.Thread, list[str]]] = {}


def drain(proc: subprocess.Popen[str]) -> None:
    """Read the process's stderr in a thread from now on; :func:`stop` returns it all."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        lines.extend(proc.stderr)

    reader = threading.Thread(target=read, name=f"drain-{proc.pid}", daemon=True)
    reader.start()
    _DRAINED[proc.pid] = (reader, lines)


def _logged(proc: subprocess.Popen[str], timeout: float | None = None) -> str:
    """Everything the process wrote to stderr, once it has exited (or within ``timeout``)."""
    drained = _DRAINED.get(proc.pid)
    if drained is None:
        _, err = proc.communicate(timeout=timeout)
        return err
    reader, lines = drained
    proc.wait(timeout)
    del _DRAINED[proc.pid]
    reader.join()
    proc.communicate()  # stdout, and the pipes closed
    return "".join(lines)


def wait_healthy(base: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"keeper serve exited with {proc.returncode}: "
                                 f"{_logged(proc)}")
        try:
            if requests.get(base + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise AssertionError("keeper serve did not become healthy in time")


def stop(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str]:
    """SIGTERM, then its exit code and everything it logged (kept for the leak test)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        err = _logged(proc, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = _logged(proc)
    OUTPUTS.texts.append(err)
    return proc.returncode, err


@contextmanager
def serving(keeper: Keeper, *, db_url: str, api_base: str, extra: str = "",
            api_extra: str = "", read_timeout: float = 0.5) -> Iterator[Served]:
    port = free_port()
    keeper.write_config(config_text(db_url=db_url, api_base=api_base, extra=extra,
                                    read_timeout=read_timeout) + f"""
[api]
listen = "127.0.0.1:{port}"
keys_file = "api-keys"
{api_extra}
""")
    keys = make_keys(keeper)
    if not db_url.startswith("sqlite"):  # as `keeper db upgrade` (in process: faster)
        engine = db.make_engine(db_url)
        db.upgrade(engine)
        engine.dispose()
    proc = keeper.start("serve")
    drain(proc)
    base = f"http://127.0.0.1:{port}"
    served = Served(base, keys, proc, keeper)
    try:
        wait_healthy(base, proc)
        yield served
    finally:
        served.session.close()
        stop(proc)
