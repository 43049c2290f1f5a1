"""keeper serve attacked at the HTTP level: idle and half-sent connections, oversized headers,
broken encodings and bodies cut short. Each is answered (or dropped) and the server goes on."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

from keeper.wechat.simulator import Simulator
from tests.api.server import Served, serving
from tests.conftest import APPID, Keeper


def _raw(served: Served, data: bytes, *, read: bool = True) -> bytes:
    host, port = served.base.removeprefix("http://").split(":")
    chunks = []
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            s.sendall(data)
            while read and (chunk := s.recv(65536)):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server closed on the rest of what was sent: a drop (or after its answer)
    return b"".join(chunks)


def test_hostile_connections_do_not_stop_the_server(served: Served, sim: Simulator) -> None:
    host, port = served.base.removeprefix("http://").split(":")
    # 300 connections that never finish their request line, and 50 that stop mid-body.
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(300)]
    for s in idle[:150]:
        s.sendall(b"GET /v1/reauth HTTP/1.1\r\nHost: x\r\n")
    for s in idle[250:]:
        s.sendall(b"PUT /v1/apps/" + APPID.encode() + b"/users/o1 HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 60000\r\n"
                  b"Authorization: Bearer " + served.keys["all"].encode() + b"\r\n\r\n{\"a")
    started = time.monotonic()
    assert served.call("GET", "/v1/reauth").status_code == 200
    assert time.monotonic() - started < 5
    for s in idle:
        s.close()

    answers = {
        "huge header": _raw(served, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
                            + b"a" * 200_000 + b"\r\n\r\n"),
        "endless headers": _raw(served, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                + b"X-A: b\r\n" * 20_000),
        "bad percent": _raw(served, b"GET /v1/unionids/%zz%ff HTTP/1.1\r\nHost: x\r\n"
                            b"Authorization: Bearer " + served.keys["all"].encode()
                            + b"\r\nConnection: close\r\n\r\n"),
        "not utf-8": _raw(served, b"GET /v1/apps/\xff\xfe/users/o HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n"),
        "bad request line": _raw(served, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        "chunked lie": _raw(served, b"POST /v1/grants HTTP/1.1\r\nHost: x\r\n"
                            b"Authorization: Bearer " + served.keys["all"].encode() + b"\r\n"
                            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            b"zz\r\n{}\r\n0\r\n\r\n"),
    }
    for name, answer in answers.items():
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b""
        assert answer == b"" or status.startswith(b"4"), (name, answer[:200])
    for name in ("huge header", "endless headers"):
        assert answers[name] == b"" or b" 431 " in answers[name].split(b"\r\n")[0], name
    # Under the cap (32 KiB for the request line and headers) is fine.
    assert served.call("GET", "/healthz", key=None,
                       headers={"X-Pad": "a" * 20_000}).status_code == 200
    assert served.call("GET", "/healthz", key=None).status_code == 200
    assert served.proc.poll() is None


def test_a_request_head_that_comes_too_slowly_is_dropped(
    keeper: Keeper, sim: Simulator, tmp_path: Path
) -> None:
    with serving(keeper, db_url=f"sqlite:///{tmp_path / 'keeper.db'}", api_base=sim.url,
                 api_extra='head_timeout = "1s"') as served:
        host, port = served.base.removeprefix("http://").split(":")
        silent = socket.create_connection((host, int(port)), timeout=10)
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert silent.recv(100) == b"" and slow.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 8
        silent.close()
        slow.close()
        # A client that is merely idle between requests is not cut mid-answer.
        assert served.call("GET", "/healthz", key=None).status_code == 200


#: The cap on a request's head: its request line and headers, up to the blank line that ends
#: them (README, "Setting it up").
HEAD_CAP = 32 * 1024


def _head_of(size: int) -> bytes:
    """A ``GET /healthz`` whose request line and headers are exactly ``size`` bytes."""
    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def _send_head(served: Served, head: bytes, chunk: int | None) -> bytes:
    """Send ``head`` in one write, or in writes of ``chunk`` bytes (each its own segment),
    and read the answer to its end (the server closes: ``Connection: close``, or a refusal)."""
    host, port = served.base.removeprefix("http://").split(":")
    answer = []
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if chunk is None:
                s.sendall(head)
            else:
                for i in range(0, len(head), chunk):
                    s.sendall(head[i:i + chunk])
                    time.sleep(0.001)  # separate reads on the server's side
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused before the rest was sent: its answer may still be there to read
        with contextlib.suppress(ConnectionResetError):
            while part := s.recv(65536):
                answer.append(part)
    return b"".join(answer)


def test_the_head_is_capped_at_32_kib_in_one_write_or_many(
    keeper: Keeper, sim: Simulator, tmp_path: Path
) -> None:
    assert len(_head_of(HEAD_CAP)) == HEAD_CAP
    with serving(keeper, db_url=f"sqlite:///{tmp_path / 'keeper.db'}",
                 api_base=sim.url) as served:
        for chunk in (None, 1024):
            for size in (HEAD_CAP - 1, HEAD_CAP):
                answer = _send_head(served, _head_of(size), chunk)
                assert answer.startswith(b"HTTP/1.1 200 "), (size, chunk, answer[:200])
            for size in (HEAD_CAP + 1, 40 * 1024, 70_000, 100_000):
                answer = _send_head(served, _head_of(size), chunk)
                status, _, body = answer.partition(b"\r\n\r\n")
                assert status.startswith(b"HTTP/1.1 431 "), (size, chunk, answer[:200])
                assert b"content-type: application/json" in status.lower(), status
                error = json.loads(body)
                assert error["error"] == "headers_too_large", error
                assert "32768" in error["detail"], error
        # A request pipelined behind another in the same write: the first is answered, then
        # the second's head is refused.
        first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = _send_head(served, first + _head_of(40 * 1024), None)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert answer.count(b"HTTP/1.1 ") == 2 and b"}HTTP/1.1 431 " in answer, answer
        assert served.call("GET", "/healthz", key=None).status_code == 200
        assert served.proc.poll() is None
