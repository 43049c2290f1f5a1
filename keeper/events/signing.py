"""The ``Keeper-Signature`` header: ``t=UNIX_SECONDS,v1=HEX``, where HEX is the HMAC-SHA256,
keyed by the webhook's secret, of ``"{t}.{raw body}"`` (docs/reference/contract.md). ``verify``
is what a receiver does; docs/guides/events.md shows it in Python, Node and PHP."""

from __future__ import annotations

import hashlib
import hmac

#: A receiver refuses a signature older (or further ahead) than this.
TOLERANCE_S = 300


def sign(secret: str, body: bytes, t: int) -> str:
    """The header value for one attempt at time ``t`` (Unix seconds)."""
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, *, now: float,
           tolerance_s: float = TOLERANCE_S) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` at a time within ``tolerance_s`` of
    ``now``. Any ``v1`` entry may match (a receiver rotating secrets can be sent two)."""
    t: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            t = int(value)
        elif name == "v1":
            macs.append(value)
    if t is None or not macs or abs(now - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, m) for m in macs)
