"""``keeper import`` lines: JSON objects, one grant each, validated before anything is stored.

Error messages name the field and the problem, never the value: a line holds tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from keeper.models import ACTIVE, Grant

REQUIRED = (
    "appid", "openid", "access_token", "refresh_token", "scope", "access_expires_at",
    "refresh_issued_at",
)
OPTIONAL = ("unionid",)


class BadLine(ValueError):
    """One import line that cannot be used; the message is safe to log."""


@dataclass(frozen=True)
class Parsed:
    line: int
    grant: Grant | None
    error: str | None = None
    unknown_keys: tuple[str, ...] = ()


def parse_time(value: object, name: str) -> datetime:
    """ISO 8601 with an offset, or Unix seconds, as an aware UTC datetime."""
    if isinstance(value, bool):
        raise BadLine(f"{name}: expected ISO 8601 with offset or Unix seconds")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise BadLine(f"{name}: Unix seconds out of range") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadLine(f"{name}: not an ISO 8601 time") from None
        if parsed.tzinfo is None:
            raise BadLine(f"{name}: ISO 8601 time needs an offset (e.g. +08:00 or Z)")
        return parsed.astimezone(UTC)
    raise BadLine(f"{name}: expected ISO 8601 with offset or Unix seconds")


def parse_line(text: str, *, appids: Iterable[str]) -> tuple[Grant, tuple[str, ...]]:
    """One line → a new grant (``id`` 0) and the keys it had that keeper does not know."""
    try:
        data = json.loads(text)
    except ValueError as e:
        column = getattr(e, "colno", "?")
        raise BadLine(f"not valid JSON ({type(e).__name__} at column {column})") from None
    if not isinstance(data, dict):
        raise BadLine("expected a JSON object")
    missing = [k for k in REQUIRED if data.get(k) in (None, "")]
    if missing:
        raise BadLine(f"missing {', '.join(missing)}")
    for key in ("appid", "openid", "access_token", "refresh_token", "scope"):
        if not isinstance(data[key], str):
            raise BadLine(f"{key}: expected a string")
    unionid = data.get("unionid")
    if unionid is not None and not isinstance(unionid, str):
        raise BadLine("unionid: expected a string")
    if data["appid"] not in set(appids):
        raise BadLine(f"appid {data['appid']!r} is not configured")
    if len(data["openid"]) > 128:
        raise BadLine("openid: longer than 128 characters")
    grant = Grant(
        id=0,
        appid=data["appid"],
        openid=data["openid"],
        unionid=(unionid or "").strip() or None,
        scope=data["scope"],
        access_token=data["access_token"],
        refresh_token=data["refresh_token"],
        access_expires_at=parse_time(data["access_expires_at"], "access_expires_at"),
        refresh_issued_at=parse_time(data["refresh_issued_at"], "refresh_issued_at"),
        state=ACTIVE,
    )
    unknown = tuple(sorted(set(data) - set(REQUIRED) - set(OPTIONAL)))
    return grant, unknown


def parse_lines(lines: Iterable[str], *, appids: Iterable[str]) -> Iterator[Parsed]:
    """Every non-blank line, numbered from 1, parsed or with its error."""
    known = set(appids)
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            grant, unknown = parse_line(text, appids=known)
        except BadLine as e:
            yield Parsed(number, None, str(e))
            continue
        yield Parsed(number, grant, None, unknown)
