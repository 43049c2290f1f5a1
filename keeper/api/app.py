"""The API as an ASGI application: :func:`create_app` builds one server process's
:class:`~keeper.api.context.Api` and serves the routes of :mod:`~keeper.api.routes` and
:mod:`~keeper.api.monitoring` with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import anyio.to_thread
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from keeper.api import monitoring, protocol, routes
from keeper.api.context import Api
from keeper.api.http import Edge, Problem
from keeper.api.keys import KeyRing
from keeper.config import Config, load_config
from keeper.log import configure
from keeper.metrics import process as metrics

log = structlog.get_logger("keeper.api")

#: Every route served, as declared on the handlers.
ROUTES = [*routes.table, *monitoring.table]


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


def create_app(config: Config, keys: KeyRing | None = None) -> Edge:
    """The application for one server process."""
    keys = keys or KeyRing(config.api.keys_file)
    api = Api(config, keys)
    metrics.enable()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = config.api.threads
        await anyio.to_thread.run_sync(api.start)
        api.client.attach(asyncio.get_running_loop())
        # Its connection pool made (and aiohttp imported, a quarter of a second) now, not in
        # the first stale token's request.
        api.client.aio.ready()
        log.info("api.started", pid=os.getpid(), keys=len(keys))
        try:
            yield
        finally:
            await api.client.detach()
            await api.reader.close()
            await anyio.to_thread.run_sync(api.close)
            log.info("api.stopped", pid=os.getpid())

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    app.state.api = api
    return Edge(app, lanes=[*routes.table.lanes, *monitoring.table.lanes])


def factory() -> Edge:
    """For server processes started by uvicorn's supervisor (``api.processes`` > 1): the
    configuration comes from ``$KEEPER_CONFIG``, which ``keeper serve`` sets."""
    config = load_config(os.environ.get("KEEPER_CONFIG"))
    configure(config.log_level)
    protocol.head_timeout_s = config.api.head_timeout_s  # this process's connections
    return create_app(config)
