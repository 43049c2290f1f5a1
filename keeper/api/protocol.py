"""uvicorn's httptools protocol with a cap on a request's head (request line and headers).

uvicorn bounds nothing there with httptools, so one client could grow a server process's
memory without end by never finishing its headers. Past ``MAX_HEAD_BYTES`` the request is
answered 431 and the connection closed (nginx's default allows four buffers of 8 KiB).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 32 * 1024
_BODY = json.dumps({"error": "headers_too_large",
                    "detail": f"the request line and headers are limited to {MAX_HEAD_BYTES} "
                              "bytes"}).encode()
_ANSWER = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
           b"content-type: application/json\r\nconnection: close\r\n"
           b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes received while a request's head is being read."""

    _head_bytes = 0
    _in_body = False

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                if not self.transport.is_closing():
                    self.transport.write(_ANSWER)
                    self.transport.close()
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body, self._head_bytes = False, 0  # the next request on this connection
