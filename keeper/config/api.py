"""The ``[api]`` table: where ``keeper serve`` listens and where its API keys are.

``listen`` is ``HOST:PORT`` (IPv6 as ``[::1]:8790``) or ``unix:/PATH``. The default is loopback:
the API hands out access tokens, so it reaches beyond the host only behind a TLS proxy the
operator puts in front of it (docs/operators/api-service.md).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeper.config.keys import default
from keeper.config.values import Table, default_seconds, path_value, show
from keeper.errors import ConfigError

DEFAULT_LISTEN: str = default("api.listen")
DEFAULT_METRICS_LISTEN: str = default("metrics_listen")
DEFAULT_KEYS_FILE: str = default("api.keys_file")
#: How large a request body may be: a login code or an import line is well under 2 KiB.
MAX_BODY_BYTES = 64 * 1024
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})$"
)


def parse_listen(value: str, key: str) -> tuple[str | None, int | None, Path | None]:
    """``HOST:PORT`` or ``unix:/PATH`` → (host, port, socket)."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path.startswith("/") or "\x00" in path or len(path) > 100:
            raise ConfigError(f"{key}: expected unix:/ABSOLUTE/PATH (at most 100 characters), "
                              f"got {show(value)}")
        return None, None, Path(path)
    m = _HOST_PORT.match(value)
    if not m or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT or unix:/PATH, got {show(value)}")
    host = m["v6"] or m["host"]
    if m["v6"]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{key}: {show(host)} is not an IPv6 address") from None
    return host, int(m["port"]), None


#: Where the default listen addresses lead (the model's defaults).
_DEFAULT_HOST, _DEFAULT_PORT, _ = parse_listen(DEFAULT_LISTEN, "api.listen")
DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT, _ = parse_listen(DEFAULT_METRICS_LISTEN,
                                                             "metrics_listen")


@dataclass(frozen=True)
class ApiConfig:
    """How ``keeper serve`` runs. ``host``/``port`` or ``socket`` (a unix socket path)."""

    listen: str = DEFAULT_LISTEN
    host: str | None = _DEFAULT_HOST
    port: int | None = _DEFAULT_PORT
    socket: Path | None = None
    #: The API keys file (digests and scopes, never a key), resolved like other files.
    keys_file: Path = Path(DEFAULT_KEYS_FILE)
    #: Server processes (uvicorn workers), all sharing one socket.
    processes: int = default("api.processes")
    #: Threads per process for requests that wait on the database or WeChat.
    threads: int = default("api.threads")
    #: Longest a token request waits for a refresh another request or process is making.
    token_wait_s: float = default_seconds("api.token_wait")
    #: A request's line and headers must arrive within this (slow clients hold connections).
    head_timeout_s: float = default_seconds("api.head_timeout")
    max_body_bytes: int = MAX_BODY_BYTES


def _whole(t: Table, name: str, low: int, high: int) -> int:
    value = t.value(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{t.key(name)}: expected a whole number from {low} to {high}, "
                          f"got {show(value)}")
    return value


def parse_api(raw: object, resolve: Callable[[str], Path]) -> ApiConfig:
    """The ``[api]`` table; ``resolve`` finds a relative file (credentials, then beside the
    configuration file)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("api: expected a table ([api])")
    t = Table(raw, "api.", "api.")
    listen = t.string("listen") or DEFAULT_LISTEN
    host, port, sock = parse_listen(listen, "api.listen")
    keys = path_value(t.value("keys_file"), "api.keys_file")
    token_wait = t.duration("token_wait")
    if not 0.1 <= token_wait <= 300:
        raise ConfigError(f"api.token_wait: expected 0.1 s to 5 min, got {token_wait:g}")
    head_timeout = t.duration("head_timeout")
    if not 1 <= head_timeout <= 300:
        raise ConfigError(f"api.head_timeout: expected 1 s to 5 min, got {head_timeout:g}")
    values: dict[str, Any] = {
        "listen": listen, "host": host, "port": port, "socket": sock,
        "keys_file": resolve(keys),
        "processes": _whole(t, "processes", 1, 64),
        "threads": _whole(t, "threads", 1, 1000),
        "token_wait_s": token_wait,
        "head_timeout_s": head_timeout,
    }
    t.finish()
    return ApiConfig(**values)


def parse_metrics_listen(value: object) -> tuple[str, str | None, int | None]:
    """``metrics_listen``: ``HOST:PORT`` (IPv6 as ``[::1]:9790``), or ``""`` for none;
    ``None`` (not set): the default, loopback port 9790."""
    if value is None:
        value = DEFAULT_METRICS_LISTEN
    if not isinstance(value, str):
        raise ConfigError(f"metrics_listen: expected \"HOST:PORT\" or \"\", got {show(value)}")
    if value == "":
        return "", None, None
    if value.startswith("unix:"):
        raise ConfigError(f"metrics_listen: expected HOST:PORT (Prometheus scrapes over TCP), "
                          f"got {show(value)}")
    host, port, _ = parse_listen(value, "metrics_listen")
    return value, host, port
