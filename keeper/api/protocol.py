"""uvicorn's httptools protocol with bounds on a request's head (request line and headers).

uvicorn bounds nothing there with httptools: one client could grow a server process's memory
without end by never finishing its headers, or hold connections open for ever by sending them
slowly (its keep-alive timeout starts only after a first answer). A head of more than
``MAX_HEAD_BYTES`` (counted from the request line's first byte to the blank line that ends the
headers; nginx's default allows four buffers of 8 KiB) is answered 431 and the connection
closed; a head not complete within ``head_timeout_s`` (``[api] head_timeout``) closes it.

The bytes are counted as the parser is given them, not per read: the parser is never handed
more of a head than the cap allows, so where the head ends inside a read (its body, or the
next request, following in the same read) does not matter, nor whether the head came in one
write or in many. A head that begins in the same read as the end of another request (a
pipelined request) is not all counted that way: it is also measured by what the parser reports
of it (its URL and headers), and refused past the cap too.
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
#: After a 431, how long what the client still sends is read and dropped before the
#: connection is closed. Closing at once, with the rest of the head unread, makes the kernel
#: reset the connection: the client's next write fails, and a TCP stack that drops unread data
#: on a reset (Windows does; Linux keeps it) loses the 431 before the client reads it.
LINGER_S = 2.0


#: Set from the configuration by the application factory, in each server process.
head_timeout_s = 10.0


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes of each request's head as the parser takes them, and times it."""

    _head_bytes = 0  # bytes of the current head given to the parser
    _parsed_head = 0  # the current head's URL and headers as the parser reported them
    _in_body = False
    _refused = False
    _owe_431 = False
    _head_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None

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
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data and not self._refused and not self.transport.is_closing():
            if self._in_body:
                super().data_received(data)
                return
            room = MAX_HEAD_BYTES - self._head_bytes
            if room <= 0:  # more of a head that has had all the bytes it may have
                self._refuse()
                return
            part, data = data[:room], data[room:]
            self._head_bytes += len(part)
            super().data_received(part)

    def _refuse(self) -> None:
        """Answer 431, read and drop what still comes for a moment, then close. An answer to
        an earlier request on this connection that is still being made goes out first."""
        self._refused = True
        self._stop_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self._owe_431 = True  # sent by on_response_complete
            return
        self._answer_431()

    def _answer_431(self) -> None:
        self._owe_431 = False
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.transport.write(_ANSWER)
        if self.transport.can_write_eof():
            # The 431, then the end of the answers; the client's end of its sending (uvicorn
            # closes on it) or the linger's end closes the connection.
            self.transport.write_eof()
            self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._owe_431:
            self._answer_431()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # the parser failing on what follows a refused head: dropped
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._parsed_head = 0
        super().on_message_begin()
        self._start_head_timer()

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            self._parsed(len(url))
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            self._parsed(len(name) + len(value) + len(b":\r\n"))
            super().on_header(name, value)

    def _parsed(self, size: int) -> None:
        """The guard for a head whose bytes were not all counted as they came (one that began
        in the same read as the end of another request): what the parser reports of it."""
        self._parsed_head += size
        if self._parsed_head > MAX_HEAD_BYTES:
            self._refuse()

    def on_headers_complete(self) -> None:
        if self._refused:
            return  # no answer to a refused head's request
        self._in_body = True
        self._stop_head_timer()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_body, self._head_bytes = False, 0  # the next request on this connection
