"""``keeper serve``: the API under uvicorn.

uvicorn (httptools parser, uvloop) with Starlette was chosen by measurement on this project's
token look-up (docs/performance/api.md). One process by default; ``api.processes`` more
share one listening socket under uvicorn's supervisor, each with its own pools. SIGTERM stops
accepting, lets requests in flight finish (at most ``GRACE_S``), then exits 0.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from types import FrameType

import structlog
import uvicorn

from keeper import __version__
from keeper.api.keys import KeyRing
from keeper.config import Config
from keeper.errors import ConfigError, DatabaseUnavailable, SchemaOutdated
from keeper.observe.exposition import MULTIPROC_ENV
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


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _wait_for_database(config: Config) -> None:
    """As ``keeper run`` does at start: wait until the database answers with a current schema
    (checked once here, not once per server process), saying so once per kind of trouble. A
    wrong encryption key is not waited for: it is a configuration error (exit 2)."""
    delay, said = 1.0, ""
    while True:
        try:
            open_store(config).close()
        except (DatabaseUnavailable, SchemaOutdated) as e:
            event = ("database.schema_outdated" if isinstance(e, SchemaOutdated)
                     else "database.unavailable")
            if event != said:
                log.error(event, command="serve", error=str(e), retry_in_s=delay)
                said = event
            time.sleep(delay)  # SIGTERM meanwhile ends keeper at once (_stopped)
            delay = min(delay * 2, 30.0)
            continue
        if said:
            log.info("database.recovered", command="serve")
        return


def serve(config: Config) -> int:
    """Run the API until SIGTERM or SIGINT; the exit code."""
    keys = KeyRing(config.api.keys_file)  # a missing or bad keys file: one line and exit 2
    if not len(keys):
        log.warning("api.no_keys", keys_file=str(config.api.keys_file),
                    hint="keeper api-key --name NAME --scopes tokens, then add its line")
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
    for app in config.apps:
        if not app.secret:
            # Once per app, here rather than per request: each POST /v1/grants for it is
            # answered 500 app_secret_missing until the secret is set and serve restarted.
            log.warning("app.secret_missing", appid=app.appid, secret_source=app.secret_source,
                        error=app.secret_problem, answer="500 app_secret_missing")
    # uvicorn re-raises the SIGTERM or SIGINT that stopped it, once it has shut down, to the
    # handler in place before it started: with the default one the process would die of it
    # (status 143 after a clean stop, not the exit 0 systemd and the contract expect). This one
    # exits 0, and also stops keeper at once if the signal comes before uvicorn listens for it.
    # (With api.processes > 1 uvicorn's supervisor takes the signals and returns by itself.)
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    shared = _multiprocess_metrics(api.processes)
    try:
        _wait_for_database(config)
        uvicorn.run(
            "keeper.api.app:factory", factory=True, workers=api.processes,
            http="keeper.api.protocol:BoundedHttpToolsProtocol", loop="uvloop", lifespan="on",
            log_config=None, access_log=False, server_header=False, proxy_headers=False,
            timeout_graceful_shutdown=GRACE_S, timeout_keep_alive=5,
            h11_max_incomplete_event_size=16 * 1024,
            **where,  # type: ignore[arg-type]
        )
    except SystemExit as e:  # uvicorn's own exit (the port is taken, the start failed), or ours
        return 1 if e.code not in (0, None) else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
    return 0


def _multiprocess_metrics(processes: int) -> str | None:
    """With several server processes, a scrape reaches one of them: prometheus_client's
    multiprocess mode makes each keep its counters in files of a private directory (made
    here, before uvicorn spawns them, and removed at exit), and any of them answer with the
    sum. Without it each process would show only its own share."""
    if processes < 2:
        return None
    directory = tempfile.mkdtemp(prefix="keeper-metrics-")  # mode 0700
    os.environ[MULTIPROC_ENV] = directory
    return directory
