"""Serving ``/metrics``: the registry a scrape reads (this process's metrics, or every server
process's in prometheus_client's multiprocess mode, plus the database collector), and the
small HTTP server ``keeper run`` answers scrapes with on ``metrics_listen``."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from keeper.observe.collector import DatabaseCollector

#: Set (by ``keeper serve`` with ``api.processes`` > 1) before the server processes start:
#: prometheus_client then keeps each process's values in files there, summed at scrape time.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _ThisProcess(Collector):
    """prometheus_client's default registry (keeper's process metrics, and the runtime's
    ``process_*`` and ``python_*`` ones), read at each scrape."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def registry_for(database: DatabaseCollector) -> CollectorRegistry:
    """What a scrape reads: the process metrics (of every server process in multiprocess
    mode) and the database's gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    registry.register(database)
    return registry


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one every 15 s would drown the log)."""


Environ = dict[str, Any]
StartResponse = Callable[..., Any]


class MetricsServer:
    """``GET /metrics`` on ``host:port`` in a thread of its own (``keeper run``)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, *,
                 on_close: Callable[[], None] | None = None) -> None:
        self.on_close = on_close
        metrics = make_wsgi_app(registry)

        def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found: scrape /metrics\n"]
            result: Iterable[bytes] = metrics(environ, start_response)
            return result

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = type("MetricsHttpServer", (_Server,), {"address_family": family})
        # Binds now: an address in use raises OSError here, before anything else starts.
        self.httpd: WSGIServer = make_server(host, port, app, server, handler_class=_Quiet)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop answering and close the socket (waits for the serving thread), then
        ``on_close`` (the collector's background reads)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        if self.on_close is not None:
            self.on_close()

