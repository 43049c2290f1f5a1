"""uvicorn's httptools protocol with bounds on a request's head (request line and headers).

uvicorn bounds nothing there with httptools: one client could grow a server process's memory
without end by never finishing its headers, or hold connections open for ever by sending them
slowly (its keep-alive timeout starts only after a first answer). Past ``MAX_HEAD_BYTES`` the
request is answered 431 and the connection closed (nginx's default allows four buffers of
8 KiB); a head not complete within ``head_timeout_s`` (``[api] head_timeout``) closes it.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 32 * 1024
_BODY = json.dumps({"error": "headers_too_large",
                    "detail": f"the request line and headers are limited to {MAX_HEAD_BYTES} "
                              "bytes"}).encode()
_ANSWER = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
           b"content-type: application/json\r\nconnection: close\r\n"
           b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


#: Set from the configuration by the application factory, in each server process.
head_timeout_s = 10.0


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes received while a request's head is being read, and times it."""

    _head_bytes = 0
    _in_body = False
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_body and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._in_body:
            super().data_received(data)
            return
        if self._head_bytes > MAX_HEAD_BYTES:
            return  # refused already; the connection is closing
        # Counted, then parsed: a chunk that completes the head may carry body bytes too,
        # which are not the head's. What is refused is a head still open past the cap.
        self._head_bytes += len(data)
        super().data_received(data)
        if (not self._in_body and self._head_bytes > MAX_HEAD_BYTES
                and not self.transport.is_closing()):
            self.transport.write(_ANSWER)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body, self._head_bytes = False, 0  # the next request on this connection
