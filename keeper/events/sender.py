"""One delivery attempt: ``POST`` the event's exact body to the webhook, signed, within a
deadline.

The whole attempt (resolving the host, connecting, the TLS handshake, sending, reading the
status line, the headers and at most :data:`MAX_ANSWER_BYTES` of the body) ends by the
webhook's ``timeout``: every blocking socket call is given only the time left until then, so a
receiver that trickles its answer a byte at a time cannot stretch it, and when the time is up
the connection is closed. The deliverer counts on that bound to keep every attempt inside the
webhook's lease (:mod:`keeper.events.deliverer`).

This is :mod:`http.client`, not ``requests``: the timeouts of ``requests`` and urllib3 (their
``total`` too) bound each read, not the request, so a byte a second keeps an attempt alive for
as long as the receiver likes, and neither has a deadline over a whole request.
:mod:`http.client` follows no redirect (a 3xx is not a delivery) and reads no proxy from the
environment; https is verified (the certificate chain, against the CA bundle ``requests``
uses, and the host name). What goes wrong is said by kind and status only ("connect
timeout", "read timeout", "TLS error", "connection failed", ...): an exception's text can
hold the url, whose query string could hold a secret of the receiver's.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from requests.utils import DEFAULT_CA_BUNDLE_PATH, requote_uri

from keeper import __version__
from keeper.config.webhooks import WebhookConfig
from keeper.events.signing import sign

#: The most of an answer's body keeper reads (it only needs the status).
MAX_ANSWER_BYTES = 4096


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: a 2xx is delivery; ``status`` None when no answer came."""

    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class DeadlinePassed(TimeoutError):
    """The attempt's deadline passed before a socket call could start."""


class Deadline:
    """A point on the monotonic clock; :meth:`left` raises once it has passed."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlinePassed
        return left


class _Timed(socket.socket):
    """A socket whose every blocking call gets only the time left before ``deadline``: one
    timeout per call (what a plain socket timeout is) would start afresh with each byte."""

    deadline: Deadline | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.left())

    # http.client reads through makefile() (recv_into) and writes with sendall; a plain
    # socket's sendall is bounded as a whole by its timeout, an SSLSocket's calls send.
    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().send(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._arm()
        super().sendall(*args, **kwargs)


class _TimedTLS(_Timed, ssl.SSLSocket):
    """What :func:`tls_context`'s ``wrap_socket`` makes (the handshake itself is bounded by the
    timeout the plain socket had, one deadline for the whole handshake)."""


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """Verifying TLS for https receivers: the chain against ``cafile`` (by default the CA
    bundle ``requests`` uses, as this sender did before) and the host name."""
    context = ssl.create_default_context(cafile=cafile or DEFAULT_CA_BUNDLE_PATH)
    context.sslsocket_class = _TimedTLS
    return context


def _resolve(host: str, port: int, deadline: Deadline) -> list[Any]:
    """``getaddrinfo`` within the deadline. The system resolver obeys no socket timeout, so a
    name is looked up on a thread of its own that is left behind if it is late (it only
    resolves: nothing is sent once the attempt has given up)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # an address: nothing to look up
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            found.append(e)
        finally:
            done.set()

    threading.Thread(target=lookup, name="keeper-events-resolve", daemon=True).start()
    if not done.wait(deadline.left()):
        raise DeadlinePassed
    if isinstance(found[0], OSError):
        raise found[0]
    return list(found[0])


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection can be read from: the receiver closed it (or sent
    what nobody asked for), so it is not used again. poll, not select: a busy process's
    descriptors can be past select's 1024."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _abort(sock: _Timed | None) -> None:
    """Close at once: shutdown first, as a reader's makefile() keeps the descriptor open past
    close(); the receiver sees the connection end now."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class Sender:
    """Sends to one webhook over one kept-alive connection (no proxy from the environment,
    no cookies, no retries of its own: the schedule is keeper's). One attempt at a time."""

    def __init__(self, hook: WebhookConfig, *, cafile: str | None = None) -> None:
        """``cafile``: the CAs an https receiver's certificate must chain to (by default the
        bundle ``requests`` uses)."""
        self.hook = hook
        parts = urlsplit(hook.url)
        self._https = parts.scheme == "https"
        self._tls = tls_context(cafile) if self._https else None
        host = parts.hostname or ""
        with contextlib.suppress(UnicodeError):  # a name in other scripts: its ASCII form
            host = host.encode("idna").decode("ascii")
        self._host = host
        self._port = parts.port or (443 if self._https else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        self._target = requote_uri(target)  # as requests sent it: non-ASCII percent-encoded
        self._auth: str | None = None
        if parts.username is not None:  # user:password@ in the url, as requests sent it
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(pair.encode()).decode()
        self._conn: http.client.HTTPConnection | None = None
        self._sock: _Timed | None = None  # the connection's, until it is closed

    def send(self, event_id: str, body: str, *, t: int) -> Outcome:
        """One attempt, signed for time ``t`` (Unix seconds: the attempt's own time); it ends
        within the webhook's timeout (and the moment it takes to close the connection)."""
        deadline = Deadline(self.hook.timeout_s)
        data = body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"keeper/{__version__}",
            "Keeper-Event-Id": event_id,
            "Keeper-Signature": sign(self.hook.require_secret(), data, t),
        }
        if self._auth is not None:
            headers["Authorization"] = self._auth
        step = "connect"
        try:
            conn = self._connection(deadline)
            step = "send"
            conn.request("POST", self._target, body=data, headers=headers)
            step = "read"
            answer = conn.getresponse()
        except TimeoutError:  # the deadline, wherever it caught the attempt
            self.close()
            return Outcome(None, f"{step} timeout")
        except ssl.SSLError:  # certificate refused, handshake failed
            self.close()
            return Outcome(None, "TLS error")
        except (OSError, http.client.HTTPException):  # refused, reset, not HTTP
            self.close()
            return Outcome(None, "connection failed")
        status = answer.status
        try:
            # A little of the body, so a short answer leaves the connection reusable; never
            # more (a receiver could send without end), and not past the deadline.
            answer.read(MAX_ANSWER_BYTES)
            reusable = answer.isclosed() and not answer.will_close
        except (OSError, http.client.HTTPException):
            reusable = False  # the status came: it stands, the connection does not
        if not reusable:  # what is unread would be taken for the next request's answer
            self.close()
            answer.close()
        return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}")

    def _connection(self, deadline: Deadline) -> http.client.HTTPConnection:
        """The kept-alive connection if the receiver has not closed it, else a new one."""
        conn, sock = self._conn, self._sock
        # conn.sock is None once an answer said it closes the connection.
        if conn is not None and sock is not None and conn.sock is sock \
                and not _closed_by_peer(sock):
            sock.deadline = deadline
            return conn
        self.close()
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, context=self._tls)
        else:
            conn = http.client.HTTPConnection(self._host, self._port)
        # Connected here, within the deadline; http.client must never connect on its own.
        conn.auto_open = 0
        conn.sock = self._sock = self._connect(deadline)
        self._conn = conn
        return conn

    def _connect(self, deadline: Deadline) -> _Timed:
        """A connection to the first address that takes it (TLS on it for https)."""
        failure: OSError = OSError("no address")
        for family, kind, proto, _, address in _resolve(self._host, self._port, deadline):
            sock = _Timed(family, kind, proto)
            try:
                sock.settimeout(deadline.left())
                sock.connect(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._tls is not None:
                    sock.settimeout(deadline.left())  # the handshake's: one for all of it
                    # A _TimedTLS: tls_context's sslsocket_class.
                    sock = cast(_TimedTLS, self._tls.wrap_socket(
                        sock, server_hostname=self._host))
            except (TimeoutError, ssl.SSLError):
                sock.close()
                raise  # no time is left for another address; a certificate refused is news
            except OSError as e:
                sock.close()
                failure = e
                continue
            sock.deadline = deadline
            return sock
        raise failure

    def close(self) -> None:
        """Close the connection (at once, mid-answer too)."""
        conn, self._conn = self._conn, None
        sock, self._sock = self._sock, None
        _abort(sock)
        if conn is not None:
            conn.close()
