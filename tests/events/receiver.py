"""A webhook receiver for tests: a threaded HTTP server on 127.0.0.1 that records every request
(and which ones were in flight at once) and answers as the test tells it."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Seen:
    event_id: str
    signature: str
    body: bytes
    status: int
    peer: tuple[str, int] | None = None  # the sender's address and port: its connection

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


def signature_ok(secret: str, raw: bytes, header: str, *, now: float) -> bool:
    """Written from the contract's words alone (not keeper's verify): ``Keeper-Signature:
    t=UNIX_SECONDS,v1=HEX``, HEX the HMAC-SHA256 keyed by the secret of ``"{t}.{raw body}"``;
    a ``t`` older than a few minutes is refused."""
    m = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", header)
    if not m or abs(now - int(m[1])) > 300:
        return False
    want = hmac.new(secret.encode(), f"{m[1]}.".encode() + raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, m[2])


@dataclass
class Receiver:
    """``answer(n, event_id)`` gives the status of the n-th request (from 0)."""

    answer: Callable[[int, str], int] = lambda n, event_id: 200
    port: int = 0
    delay_s: float = 0.0
    endless: bool = False
    secret: str | None = None
    tls: ssl.SSLContext | None = None  # https, with this server context
    seen: list[Seen] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    most_at_once: int = 0
    bad_signatures: int = 0

    def __post_init__(self) -> None:
        self.changed = threading.Condition()
        self._in_flight: Counter[str] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                receiver._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        # A sender killed mid-request (kill -9 tests) resets its connection: not news here.
        self.server.handle_error = lambda *_: None  # type: ignore[method-assign]
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if self.tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/hooks/keeper"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        event_id = h.headers.get("Keeper-Event-Id", "")
        signature = h.headers.get("Keeper-Signature", "")
        with self.changed:
            n = len(self.seen) + sum(self._in_flight.values())
            if sum(self._in_flight.values()) >= 1:
                self.overlaps.append(event_id)  # another request is in flight right now
            self._in_flight[event_id] += 1
            self.most_at_once = max(self.most_at_once, sum(self._in_flight.values()))
        if self.secret is not None and not signature_ok(self.secret, raw, signature,
                                                        now=time.time()):
            self.bad_signatures += 1
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow receiver (not a test waiting for something)
        status = self.answer(n, event_id)
        with self.changed:
            self._in_flight[event_id] -= 1
            self.seen.append(Seen(event_id, signature, raw, status, h.client_address[:2]))
            self.changed.notify_all()
        h.send_response(status)
        if status in (301, 302, 307, 308):
            h.send_header("Location", self.url + "/moved")
        if self.endless:
            h.send_header("Content-Type", "text/plain")
            h.end_headers()
            try:
                while True:
                    h.wfile.write(b"x" * 65536)
            except OSError:
                return
        h.send_header("Content-Length", "2")
        h.end_headers()
        try:
            h.wfile.write(b"ok")
        except OSError:
            return  # keeper gave up waiting (a timeout test)

    def delivered(self) -> set[str]:
        with self.changed:
            return {s.event_id for s in self.seen if 200 <= s.status < 300}

    def wait_for(self, predicate: Callable[[Receiver], bool], timeout: float = 30) -> None:
        """Wait (on the receiver's condition, not a sleep) until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"receiver: condition not met; saw {len(self.seen)}")
                self.changed.wait(left)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Trickler:
    """A receiver that reads one request, then sends its answer's status line and headers one
    byte every ``interval_s``, without end: no read ever waits long, so a timeout per read
    never fires. (``at_once`` is sent first, all of it: a head, to trickle the body.) It stops
    only when the test calls :meth:`stop`; ``closed`` is set when the sender closed the
    connection (end of stream or reset), ``sent`` counts the bytes trickled."""

    ANSWER = b"HTTP/1.1 200 OK\r\nX-Trickle: "  # then "a" for ever: one endless header line

    def __init__(self, interval_s: float = 1.0, *, at_once: bytes = b"") -> None:
        self.interval_s = interval_s
        self.at_once = at_once
        self.sent = 0
        self.closed = threading.Event()
        self.request = b""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/keeper"
        self._wake_r, self._wake_w = socket.socketpair()  # stop() wakes the thread at once
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _wait(self, sock: socket.socket, timeout: float | None) -> bool:
        """Wait until ``sock`` can be read (True) or ``timeout`` passed (False); raises
        EOFError once stop() was called."""
        readable, _, _ = select.select([sock, self._wake_r], [], [], timeout)
        if self._wake_r in readable:
            raise EOFError
        return bool(readable)

    def _serve(self) -> None:
        try:
            self._wait(self._listener, None)
            conn, _ = self._listener.accept()
        except (EOFError, OSError):
            return
        with conn:
            try:
                while b"\r\n\r\n" not in self.request:  # keeper's body fits the first reads
                    self._wait(conn, None)
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    self.request += chunk
                conn.sendall(self.at_once)
                answer = b"" if self.at_once else self.ANSWER
                while True:
                    conn.sendall(answer[:1] or b"a")
                    self.sent += 1
                    answer = answer[1:]
                    # The pause between bytes, watching for the sender closing meanwhile.
                    if self._wait(conn, self.interval_s) and not conn.recv(65536):
                        self.closed.set()
                        return
            except EOFError:
                return
            except OSError:  # a reset, or a write after keeper closed
                self.closed.set()

    def stop(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(5)
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()


def tls_files(directory: Path) -> tuple[ssl.SSLContext, str]:
    """A CA of the test's own and a certificate it signed for the name ``localhost`` (only):
    the server context that presents it, and the file of the CA, for a client to trust."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keeper test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=False, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cafile, certfile, keyfile = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certfile, keyfile)
    return server, str(cafile)
