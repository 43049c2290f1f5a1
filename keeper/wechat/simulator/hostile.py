"""Hostile avatar hosts under ``/hostile/<kind>/``: answers no avatar client should accept (an
endless body, a decompression bomb, redirects out or in a loop, lying content types...)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from keeper.wechat.simulator.images import (
    GIF_1X1,
    JPEG_1X1,
    PNG_SIGNATURE,
    WEBP_1X1,
    avatar_png,
    bomb_png,
)
from keeper.wechat.simulator.records import HOSTILE_OK_KEY
from keeper.wechat.simulator.replies import BUSY_PAGE, NOT_FOUND, Reply
from keeper.wechat.simulator.state import SimState

HOSTILE_KINDS: tuple[str, ...] = (
    "endless", "html", "redirect-out", "redirect-loop", "redirect-ok", "truncated", "bomb",
    "gif", "webp", "jpeg", "slow",
)
HOSTILE_SLOW_S = 5.0  # how long /hostile/slow/ waits before answering (read per request)
HOSTILE_ENDLESS_MAX_BYTES = 64 * 1024 * 1024  # where /hostile/endless/ gives up all the same
HOSTILE_REDIRECT_OUT = "http://evil.example.invalid/x.png"
_ENDLESS_CHUNK = 64 * 1024
_HOP_RE = re.compile(r"[0-9]{1,9}")


def hostile_url(base_url: str, kind: str) -> str:
    """The URL of a hostile avatar of this ``kind`` (one of ``HOSTILE_KINDS``) on the
    simulator at ``base_url``."""
    if kind not in HOSTILE_KINDS:
        raise ValueError(f"unknown hostile kind {kind!r}; expected one of {HOSTILE_KINDS}")
    return f"{base_url}/hostile/{kind}/a.png"


def hostile_reply(sim: SimState, path: str) -> Reply:
    """The answer to ``/hostile/<kind>/...``, counted in ``sim``'s ``hostile_requests`` (not
    an API call: never in the endpoint figures, never forced or failed)."""
    kind, _, rest = path.removeprefix("/hostile/").partition("/")
    if kind not in HOSTILE_KINDS:
        return NOT_FOUND
    sim.count_hostile_request(kind)
    if kind == "redirect-loop":
        hop = int(rest) + 1 if _HOP_RE.fullmatch(rest) else 1
        return _redirect(f"{sim.url}/hostile/redirect-loop/{hop}")
    if kind == "redirect-ok":
        return _redirect(f"{sim.url}/mmopen/{HOSTILE_OK_KEY}/0")
    if kind == "slow":
        return Reply(200, "image/png", avatar_png("hostile-slow", 46), stall_s=HOSTILE_SLOW_S)
    return _HOSTILE_REPLIES[kind]


def _redirect(location: str) -> Reply:
    return Reply(302, "text/html", b"", headers=(("Location", location),))


def _endless_png() -> Iterator[bytes]:
    """A PNG signature, then zeros: HOSTILE_ENDLESS_MAX_BYTES in all, unless the client hangs
    up first (the handler stops at the first failed write)."""
    zeros = bytes(_ENDLESS_CHUNK)
    yield PNG_SIGNATURE + zeros[len(PNG_SIGNATURE):]
    for _ in range(HOSTILE_ENDLESS_MAX_BYTES // _ENDLESS_CHUNK - 1):
        yield zeros


def _hostile_replies() -> dict[str, Reply]:
    half_png = avatar_png("hostile-truncated", 64)
    return {
        "endless": Reply(200, "image/png", b"", stream=_endless_png),
        "html": Reply(200, "image/jpeg", BUSY_PAGE),
        "redirect-out": _redirect(HOSTILE_REDIRECT_OUT),
        "truncated": Reply(200, "image/png", half_png[: len(half_png) // 2]),
        "bomb": Reply(200, "image/png", bomb_png()),
        "gif": Reply(200, "image/gif", GIF_1X1),
        "webp": Reply(200, "image/webp", WEBP_1X1),
        "jpeg": Reply(200, "image/jpeg", JPEG_1X1),
    }


# The hostile answers that never change (redirect-loop, redirect-ok and slow are made per request).
_HOSTILE_REPLIES = _hostile_replies()

