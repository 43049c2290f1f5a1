"""The simulator's HTTP server: ``Simulator`` (the simulator's state served over HTTP: its life
cycle and its request routing) and the threaded loopback server and handler."""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from keeper.wechat.simulator import hostile
from keeper.wechat.simulator.admin import admin_route
from keeper.wechat.simulator.authorize import LOGIN_PAGES, login_page
from keeper.wechat.simulator.records import SimQuota
from keeper.wechat.simulator.replies import NOT_FOUND, Reply, admin_reply
from keeper.wechat.simulator.state import SimState

_PATHS = {"/sns/oauth2/access_token": "code", "/sns/oauth2/refresh_token": "refresh",
          "/sns/auth": "auth", "/sns/userinfo": "userinfo"}
_STREAM_WRITE_TIMEOUT_S = 10.0  # a client that neither reads nor hangs up is given up on


class Simulator(SimState):
    """WeChat's OAuth2 endpoints on a loopback HTTP server, with knobs for every failure.

    ``latency_s``: slept before every answer but the ``/_sim/`` admin API's (outside any
    lock).
    ``refresh_token_days``: refresh-token lifetime, in days. ``quotas``: per-app quota by
    endpoint ("code", "refresh", "userinfo", "auth"); default WeChat's documented ones, none
    for auth. ``failure_rates``: failure kind ("-1", "502", "truncated", "timeout", "html") ->
    probability per API request. ``timeout_sleep_s``: how long a "timeout" stalls before the
    connection is closed. ``seed``: seeds the random failures. ``clock``: returns Unix seconds.
    ``avatar_change_every``: when N > 0, a user changes avatar (gets a new image key, the old
    URL 404s) just before every Nth successful userinfo answer about them; 0 = never.
    ``legacy_profiles``: every user's profile is the full pre-2021 one (sex 1, a province, city
    and country) instead of today's common case (sex 0, region fields empty); per user, pass
    ``legacy_profile=True`` to add_grant or issue_code.

    As WeChat does today: every error's errmsg ends in ``, rid: <hex>-<hex>-<hex>``; a code's
    scope is ``snsapi_login`` (a website's QR login) unless given; a newer grant of the same
    user in the same app (a code exchange, or add_grant) replaces the older one's tokens, so the
    older refresh token answers 40030. ``script()`` serves a user the odd answers of
    ``keeper.wechat.simulator.answers.ODD_ANSWERS`` (or any errcode) on chosen endpoints.

    ``/connect/qrconnect`` (and ``/connect/oauth2/authorize``) is the authorize page a user
    logs in on: confirming it redirects to the app's redirect_uri with a fresh code and the
    state (see ``keeper.wechat.simulator.authorize``).

    Avatar (``/mmopen/``), hostile (``/hostile/``) and authorize-page requests are not API
    calls: they are neither counted in the endpoint figures nor ever given a forced or random
    failure.

    What the simulator holds, how it answers and its set-up and ``stats`` methods are
    :class:`~keeper.wechat.simulator.state.SimState`'s; this class serves it over HTTP.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0,
                 rotate_refresh_tokens: bool = False, refresh_token_days: float = 30.0,
                 quotas: dict[str, SimQuota] | None = None,
                 failure_rates: dict[str, float] | None = None, timeout_sleep_s: float = 5.0,
                 seed: int | None = None, clock: Callable[[], float] = time.time,
                 avatar_change_every: int = 0, legacy_profiles: bool = False) -> None:
        super().__init__(latency_s=latency_s, rotate_refresh_tokens=rotate_refresh_tokens,
                         refresh_token_days=refresh_token_days, quotas=quotas,
                         failure_rates=failure_rates, timeout_sleep_s=timeout_sleep_s,
                         seed=seed, clock=clock, avatar_change_every=avatar_change_every,
                         legacy_profiles=legacy_profiles)
        self._address = (host, port)
        self._lifecycle = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url = ""

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``; valid once start() has bound the port."""
        if not self._url:
            raise RuntimeError("the simulator is not listening yet: call start()")
        return self._url

    def hostile_url(self, kind: str) -> str:
        """The URL of a hostile avatar of this ``kind`` (one of ``HOSTILE_KINDS``)."""
        return hostile.hostile_url(self.url, kind)

    def _bind(self) -> _Server:
        with self._lifecycle:
            if self._server is not None:
                raise RuntimeError("the simulator is already started")
            self._server = _Server(self._address, self)
            host, port = self._server.socket.getsockname()[:2]
            self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            return self._server

    def start(self) -> None:
        """Serve in a background daemon thread; returns once the socket is listening."""
        server = self._bind()
        # A short poll interval: stop() waits for the loop to notice, once per test.
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        name="wechat-simulator", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in the calling thread until stop() is called from another thread."""
        server = self._bind()
        try:
            server.serve_forever(0.05)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent. Stalled answers are abandoned."""
        with self._lifecycle:
            server, self._server, thread, self._thread = self._server, None, self._thread, None
        if server is not None:
            server.stopping.set()
            # Every bound server is (about to be) serving, so shutdown() cannot wait forever.
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    # -- request handling (called by _Handler) -----------------------------------------------

    def _handle(self, method: str, path: str, query: str, body: bytes) -> tuple[Reply, float]:
        """The reply, and how long to sleep before sending it."""
        if path.startswith("/_sim/"):
            return admin_route(self, method, path.removeprefix("/_sim/"), query, body), 0.0
        endpoint = _PATHS.get(path)
        if method == "GET" and endpoint is not None:
            reply = self.serve_api(endpoint, dict(parse_qsl(query, keep_blank_values=True)))
        elif method == "GET" and path.startswith("/mmopen/"):
            reply = self.serve_avatar(path)
        elif method == "GET" and path.startswith("/hostile/"):
            reply = hostile.hostile_reply(self, path)
        elif method in ("GET", "POST") and path in LOGIN_PAGES:
            reply = login_page(self, method, path, query, body)
        else:
            reply = NOT_FOUND
        return reply, reply.stall_s or self.latency_s


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled "timeout" answer must not keep the process alive
    allow_reuse_address = True
    request_queue_size = 1024  # a bench opens dozens of connections at once

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self.stopping = threading.Event()  # set by stop(): stalls and streams end early
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup, slow on machines without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # else the client gave up
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a bench would otherwise spend itself connecting
    server_version = "WeChatSimulator/1.0"
    sys_version = ""
    # Headers and body go out in two writes; with Nagle, delayed ACKs would add ~40 ms to each.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a log line per request would cost more than answering it."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.send_error(400, "bad Content-Length")
            return
        body = self.rfile.read(int(length))
        url = urlsplit(self.path)
        try:
            reply, delay_s = self.server.sim._handle(method, url.path, url.query, body)
        except Exception:
            traceback.print_exc()
            reply, delay_s = admin_reply({"error": "simulator bug, see its stderr"}, 500), 0.0
        if delay_s > 0:
            self.server.stopping.wait(delay_s)
        if reply.close and not reply.body:
            self.close_connection = True  # a simulated timeout: no answer at all
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.stream is not None:
            self._stream(reply.stream())
            return
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def _stream(self, chunks: Iterator[bytes]) -> None:
        """Send a body delimited by the connection's close, until the chunks run out, the
        client hangs up or stops reading for long, or the simulator stops."""
        self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.connection.settimeout(_STREAM_WRITE_TIMEOUT_S)
        try:
            for chunk in chunks:
                if self.server.stopping.is_set():
                    break
                self.wfile.write(chunk)
        except (ConnectionError, TimeoutError):  # BrokenPipeError, ConnectionResetError...
            pass  # the client is gone (or as good as): stop writing, close the connection


