"""``GET /metrics`` (Prometheus) and ``GET /status`` (the status page): both need a key with
the ``read`` scope, as the rest of what describes users does. Not "open on loopback": the
API is meant to sit behind a TLS proxy on the same host, where every request comes from
loopback. ``/status`` also takes the key as the password of HTTP Basic authentication, so a
browser asks for it (any user name)."""

from __future__ import annotations

from typing import Any

from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from keeper.api.context import Api
from keeper.api.http import RouteTable
from keeper.api.status_page import render
from keeper.clock import utcnow
from keeper.observe.report import build_report

#: ``/metrics`` and ``/status``, each declared on its handler.
table = RouteTable()


@table.endpoint("GET", "/metrics", "read")
def metrics(api: Api, request: Request, body: Any) -> Response:
    # The text format, or OpenMetrics when the scraper asks for it (as make_wsgi_app does
    # for keeper run's listener).
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(api.registry), media_type=content_type,
                    headers={"Cache-Control": "no-store"})


@table.endpoint("GET", "/status", "read", basic=True)
def status(api: Api, request: Request, body: Any) -> Response:
    page = render(build_report(api.store, api.config, utcnow()))
    return HTMLResponse(page, headers={
        "Cache-Control": "no-store",
        # Nothing on the page loads from anywhere, and nothing may: the page is its own.
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                   "img-src data:; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    })
