"""The API as an ASGI application: :func:`create_app` wires keeper's parts (one
:class:`~keeper.service.runtime.Runtime` per process) to the routes.

Each server process has its own connection pool, quota gate and token desk; processes and
hosts coordinate through the database as sweeps do (leases, the shared quota rows). A thread
replays the local journal every few seconds, so a token WeChat renewed while the database was
down is written as soon as the database is back, not at the next restart.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from keeper.api import protocol
from keeper.api.http import AccessLog, Handler, Problem, unavailable
from keeper.api.keys import KeyRing
from keeper.api.logins import CodeRejected, ExchangeFailed
from keeper.api.openapi import document
from keeper.api.routes import ROUTES
from keeper.api.tokens import MustReauthorize, NoGrant, TokenDesk, Unavailable
from keeper.clock import utcnow
from keeper.config import Config, load_config
from keeper.errors import ConfigError, DatabaseUnavailable, StoreError
from keeper.log import configure
from keeper.metrics import process as metrics
from keeper.observe.collector import DatabaseCollector
from keeper.observe.exposition import registry_for
from keeper.service.runtime import Runtime
from keeper.store.token_reader import TokenReader
from keeper.sweep.journal import Journal

log = structlog.get_logger("keeper.api")

JOURNAL_REPLAY_S = 3.0
#: Database connections each server process keeps (its handler threads share them).
POOL_SIZE = 8


class Api:
    """What the handlers share within one server process."""

    def __init__(self, config: Config, keys: KeyRing) -> None:
        self.config = config
        self.keys = keys
        self.appids = frozenset(a.appid for a in config.apps)
        # A fixed pool, no overflow: with the default (4, and 4 more opened and closed as
        # needed), requests at c=32 opened ~25 PostgreSQL sessions a second, a backend fork
        # each. Eight stay open (the same most as before); the handler threads take turns.
        self.rt = Runtime.build(config, open_store=False, pool_size=POOL_SIZE, max_overflow=0)
        self.store = self.rt.store
        # A request waits for a quota permit no longer than for a busy grant (a sweep waits
        # longer: it has nobody waiting on it).
        self.rt.worker.quota_wait_s = min(config.api.token_wait_s, 5.0)
        self.journal: Journal = self.rt.journal()
        self.desk = TokenDesk(store=self.store, worker=self.rt.worker, lease_s=config.lease_s,
                              wait_s=config.api.token_wait_s, journal=self.journal,
                              clock=utcnow)
        # The token endpoint's fast path (a fresh token read on the event loop).
        self.reader = TokenReader(self.store.engine, self.store.cipher,
                                  pooler=self.store.pooler)
        self.openapi = document(config, utcnow()).encode("utf-8")
        # /metrics: this process's metrics (every server process's, in multiprocess mode)
        # and the database's gauges, read at most every few seconds.
        self.collector = DatabaseCollector(store=lambda: self.store, config=lambda: self.config)
        self.registry = registry_for(self.collector)
        self._replayer: threading.Thread | None = None

    def start(self) -> None:
        self.store.open()
        self._replayer = threading.Thread(target=self._replay, name="journal-replay",
                                          daemon=True)
        self._replayer.start()

    def close(self) -> None:
        self.collector.close()
        self.rt.stop.set()
        if self._replayer is not None:
            self._replayer.join(timeout=5)
        self.rt.close()

    def _replay(self) -> None:
        while not self.rt.stop.wait(JOURNAL_REPLAY_S):
            if not self.journal.files():
                continue
            try:
                counts = self.journal.replay(self.store, utcnow())
            except StoreError:
                continue  # still down: the files wait for the next round
            except Exception:
                log.exception("journal.replay_failed")
                continue
            if counts["files"]:
                log.info("journal.replayed", **counts)

    def answer(self, fn: Handler, request: Request, body: Any) -> Response:
        """Run a handler; keeper's exceptions become the contract's answers."""
        try:
            return fn(self, request, body)
        except Problem as p:
            return p.response()
        except NoGrant as e:
            return Problem(404, "no_grant", str(e)).response()
        except MustReauthorize as e:
            r = e.record
            return Problem(409, "reauth_required", str(e),
                           reason=r.reason if r else "other", errcode=r.errcode if r else None,
                           since=r.since.isoformat() if r else None).response()
        except Unavailable as e:
            return unavailable(e.code, str(e), e.retry_after_s).response()
        except CodeRejected as e:
            return Problem(400, "code_rejected", str(e), errcode=e.errcode).response()
        except ExchangeFailed as e:
            return unavailable("wechat_unavailable", str(e), e.retry_after_s).response()
        except ConfigError as e:  # the app has no AppSecret, or WeChat refuses the app
            log.error("api.app_rejected", error=str(e))
            return unavailable("app_rejected", str(e), 60).response()
        except DatabaseUnavailable as e:
            return unavailable("database_unavailable", str(e), 5).response()
        except StoreError as e:
            log.error("api.database_error", error=str(e))
            return unavailable("database_unavailable", str(e), 5).response()
        except Exception as e:
            # A bug: the text is left out (it might hold a value being handled).
            log.exception("api.crashed", route=request.scope.get("keeper.route"),
                          error=type(e).__name__)
            return Problem(500, "internal_error", "keeper failed; see its log").response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed(request)
    return Problem(exc.status_code, codes.get(exc.status_code, "bad_request"),
                   str(exc.detail), headers=headers).response()


def _allowed(request: Request) -> str:
    """Every method the request's path answers: each method of a path is a route of its own,
    and Starlette's 405 names only the first route's."""
    methods = {m for route in ROUTES if route.matches(request.scope)[0] is not Match.NONE
               for m in route.methods or ()}
    return ", ".join(sorted(methods))


def create_app(config: Config, keys: KeyRing | None = None) -> Starlette:
    """The application for one server process."""
    keys = keys or KeyRing(config.api.keys_file)
    api = Api(config, keys)
    metrics.enable()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = config.api.threads
        await anyio.to_thread.run_sync(api.start)
        log.info("api.started", pid=os.getpid(), keys=len(keys))
        try:
            yield
        finally:
            await api.reader.close()
            await anyio.to_thread.run_sync(api.close)
            log.info("api.stopped", pid=os.getpid())

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    app.state.api = api
    app.add_middleware(AccessLog)
    return app


def factory() -> Starlette:
    """For server processes started by uvicorn's supervisor (``api.processes`` > 1): the
    configuration comes from ``$KEEPER_CONFIG``, which ``keeper serve`` sets."""
    config = load_config(os.environ.get("KEEPER_CONFIG"))
    configure(config.log_level)
    protocol.head_timeout_s = config.api.head_timeout_s  # this process's connections
    return create_app(config)

