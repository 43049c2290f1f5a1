"""A webhook receiver for tests: a threaded HTTP server on 127.0.0.1 that records every request
(and which ones were in flight at once) and answers as the test tells it."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    event_id: str
    signature: str
    body: bytes
    status: int

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
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/keeper"
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
            self.seen.append(Seen(event_id, signature, raw, status))
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
