"""``keeper serve``: the API under uvicorn.

uvicorn (httptools parser, uvloop) with Starlette was chosen by measurement on this project's
token look-up (README, "The application API"). One process by default; ``api.processes`` more
share one listening socket under uvicorn's supervisor, each with its own pools. SIGTERM stops
accepting, lets requests in flight finish (at most ``GRACE_S``), then exits 0.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import structlog
import uvicorn

from keeper import __version__
from keeper.api.keys import KeyRing
from keeper.config import Config
from keeper.errors import ConfigError
from keeper.service.runtime import open_store

log = structlog.get_logger("keeper.api")

#: How long requests in flight may take to finish after SIGTERM (systemd waits 10 s).
GRACE_S = 8


def _clear_stale_socket(path: Path) -> None:
    """Remove a unix socket left by a process that died; refuse one that is in use."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise ConfigError(f"api.listen: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)
            return
        raise
    finally:
        probe.close()
    raise ConfigError(f"api.listen: another server listens on {path}")


def serve(config: Config) -> int:
    """Run the API until SIGTERM or SIGINT; the exit code."""
    KeyRing(config.api.keys_file)  # a missing or bad keys file: one line and exit 2, now
    # The schema and the encryption key, checked before any server process starts: an
    # outdated schema or a wrong key is one line (not a traceback per process).
    open_store(config).close()
    api = config.api
    where: dict[str, object]
    if api.socket is not None:
        _clear_stale_socket(api.socket)
        where = {"uds": str(api.socket)}
    else:
        where = {"host": api.host, "port": api.port}
    # Server processes started by the supervisor read the configuration again from here.
    os.environ["KEEPER_CONFIG"] = str(Path(config.source).resolve())
    log.info("keeper.started", version=__version__, pid=os.getpid(), command="serve",
             listen=api.listen, processes=api.processes, **config.redacted())
    try:
        uvicorn.run(
            "keeper.api.app:factory", factory=True, workers=api.processes,
            http="httptools", loop="uvloop", lifespan="on",
            log_config=None, access_log=False, server_header=False, proxy_headers=False,
            timeout_graceful_shutdown=GRACE_S, timeout_keep_alive=5,
            h11_max_incomplete_event_size=16 * 1024,
            **where,  # type: ignore[arg-type]
        )
    except SystemExit as e:  # uvicorn's own exit: the port is taken, the start failed
        return 1 if e.code not in (0, None) else 0
    return 0
