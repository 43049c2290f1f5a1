"""The simulator's HTTP replies: the ``Reply`` every part of it returns and its server sends,
WeChat's API answers (JSON under a charset-less text/plain, error bodies, the broken answers of
the failure kinds), the admin API's JSON, and the pages of a missing or busy server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from keeper.wechat.simulator.errmsgs import errmsg, with_rid

_HTML_404 = b"<html><head><title>404 Not Found</title></head><body>404 Not Found</body></html>\n"
_HTML_502 = (b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad "
             b"Gateway</h1></center><hr><center>stgw</center></body></html>\n")
#: WeChat's "system is busy" page: the "html" failure kind, and an avatar that is no image.
BUSY_PAGE = (b"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>WeChat</title></head>"
             b"<body><p>The system is busy, please try again later.</p></body></html>\n")


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer: status, Content-Type and body, and how the server is to send it."""

    status: int
    content_type: str
    body: bytes
    stall_s: float = 0.0  # a simulated timeout: stall this long instead of the latency...
    close: bool = False  # ...then close the connection (without answering when body is empty)
    headers: tuple[tuple[str, str], ...] = ()  # more headers, e.g. a redirect's Location
    # A body of unknown length instead of ``body``: sent without Content-Length as the chunks
    # come, then the connection is closed.
    stream: Callable[[], Iterator[bytes]] | None = None


NOT_FOUND = Reply(404, "text/html", _HTML_404)


def error(errcode: int, text: str | None = None) -> dict[str, object]:
    """An error body: ``text`` (by default WeChat's text for the errcode) as its errmsg; the
    rid is for the caller to add (``with_rid``)."""
    return {"errcode": errcode, "errmsg": text or errmsg(errcode)}


def _json_body(payload: Mapping[str, object]) -> bytes:
    # Raw UTF-8 under a charset-less text/plain, as WeChat sends: clients must decode it as UTF-8.
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (a truncated emoji) goes out escaped
        return json.dumps(payload, separators=(",", ":")).encode()


def api_reply(payload: Mapping[str, object]) -> Reply:
    """An answer of WeChat's API, as WeChat sends it."""
    return Reply(200, "text/plain", _json_body(payload))


def admin_reply(payload: Mapping[str, object], status: int = 200) -> Reply:
    """An answer of the ``/_sim/`` admin API: plain JSON."""
    return Reply(status, "application/json", json.dumps(payload).encode())


def failure_reply(failure: int | str, payload: Mapping[str, object], stall_s: float,
                  rid: str) -> Reply:
    """What a forced or random failure sends: an errcode (int) or a failure kind. "truncated"
    cuts ``payload`` in half; "timeout" stalls ``stall_s``, then hangs up without answering."""
    if isinstance(failure, int):
        return api_reply(error(failure, with_rid(errmsg(failure), rid)))
    if failure == "truncated":
        body = _json_body(payload)
        return Reply(200, "text/plain", body[: len(body) // 2])
    return {
        "-1": api_reply(error(-1, with_rid(errmsg(-1), rid))),
        "502": Reply(502, "text/html", _HTML_502),
        "html": Reply(200, "text/html", BUSY_PAGE),
    }.get(failure) or Reply(0, "", b"", stall_s=stall_s, close=True)  # "timeout"
