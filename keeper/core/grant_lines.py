"""``keeper import`` lines: JSON objects, one grant each, validated before anything is stored.

Every field is checked against what WeChat can send, so a line that reaches the database is
one the database, the policy and the log can all hold: printable ASCII ids and tokens of a
sane length, times inside a sane window (year 9999 would overflow the policy's arithmetic).
Error messages name the field and the problem, never the value: a line holds tokens.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from keeper.core.models import ACTIVE, Grant

REQUIRED = (
    "appid", "openid", "access_token", "refresh_token", "scope", "access_expires_at",
    "refresh_issued_at",
)
OPTIONAL = ("unionid",)

#: A longer line is refused before it is parsed (a real one is under 1 KiB).
MAX_LINE_BYTES = 64 * 1024
#: WeChat's tokens are ~100 ASCII characters; the cap leaves room and keeps rows small.
MAX_TOKEN_BYTES = 512
#: WeChat's ids are 28-ish characters of ``[A-Za-z0-9_-]``.
MAX_ID_CHARS = 128
MAX_SCOPE_CHARS = 128  # the width of its column
#: No WeChat grant predates this.
EARLIEST = datetime(2010, 1, 1, tzinfo=UTC)
#: How far ahead of ``now`` each time may be (an access token lives 2 h; a little clock skew).
AHEAD = {"access_expires_at": timedelta(days=366), "refresh_issued_at": timedelta(days=1)}

#: WeChat's ids as keeper takes them anywhere (import lines, API paths).
ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_CHARS}}}")
_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{MAX_TOKEN_BYTES}}}")
_SCOPE = re.compile(r"[a-z_]+(?:,[a-z_]+)*")


class BadLine(ValueError):
    """One import line that cannot be used; the message is safe to log.

    ``field`` names the field at fault (``None``: the line as a whole).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


@dataclass(frozen=True)
class Parsed:
    line: int
    grant: Grant | None
    error: str | None = None
    unknown_keys: tuple[str, ...] = ()
    field: str | None = None


def parse_time(value: object, name: str, *, now: datetime | None = None) -> datetime:
    """ISO 8601 with an offset, or Unix seconds, as an aware UTC datetime.

    With ``now``, the time must lie between 2010-01-01 and ``now`` plus the field's allowance
    (:data:`AHEAD`; a day when the field has none).
    """
    if isinstance(value, bool):
        raise BadLine("expected ISO 8601 with offset or Unix seconds", name)
    if isinstance(value, int | float):
        # Checked before converting: nan, inf and 10**400 are JSON numbers too.
        if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value <= 1e11:
            raise BadLine("Unix seconds out of range", name)
        parsed = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        if len(value) > 64:
            raise BadLine("not an ISO 8601 time", name)
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadLine("not an ISO 8601 time", name) from None
        if parsed.tzinfo is None:
            raise BadLine("ISO 8601 time needs an offset (e.g. +08:00 or Z)", name)
        try:
            parsed = parsed.astimezone(UTC)
        except OverflowError:  # year 1 with a positive offset, year 9999 with a negative one
            raise BadLine("time out of range", name) from None
    else:
        raise BadLine("expected ISO 8601 with offset or Unix seconds", name)
    if now is not None:
        latest = now + AHEAD.get(name, timedelta(days=1))
        if not EARLIEST <= parsed <= latest:
            raise BadLine(f"time out of range (expected {EARLIEST:%Y-%m-%d} to "
                          f"{latest:%Y-%m-%d})", name)
    return parsed


def _string(data: dict[str, object], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise BadLine("expected a string", key)
    if not pattern.fullmatch(value):
        raise BadLine(f"expected {what}", key)
    return value


def _text(raw: str | bytes) -> str:
    if len(raw) > MAX_LINE_BYTES:
        raise BadLine(f"line longer than {MAX_LINE_BYTES // 1024} KiB")
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadLine("not UTF-8 text") from None
    try:
        size = len(raw.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        raise BadLine("not valid Unicode") from None
    if size > MAX_LINE_BYTES:
        raise BadLine(f"line longer than {MAX_LINE_BYTES // 1024} KiB")
    return raw


def parse_line(
    raw: str | bytes, *, appids: Iterable[str], now: datetime | None = None
) -> tuple[Grant, tuple[str, ...]]:
    """One line → a new grant (``id`` 0) and the keys it had that keeper does not know.

    ``now`` bounds the times (see :func:`parse_time`); every field is checked before a grant
    is made, so a line is taken whole or not at all.
    """
    text = _text(raw)
    try:
        data = json.loads(text)
    except RecursionError:
        raise BadLine("not valid JSON (nested too deeply)") from None
    except ValueError as e:
        column = getattr(e, "colno", "?")
        raise BadLine(f"not valid JSON ({type(e).__name__} at column {column})") from None
    if not isinstance(data, dict):
        raise BadLine("expected a JSON object")
    missing = [k for k in REQUIRED if data.get(k) in (None, "")]
    if missing:
        error = BadLine(f"missing {', '.join(missing)}")
        error.field = missing[0]
        raise error
    appid = _string(data, "appid", ID_RE, "an appid (printable ASCII, no spaces)")
    if appid not in set(appids):
        raise BadLine("not configured (no [[apps]] entry)", "appid")
    openid = _string(data, "openid", ID_RE, f"an openid (printable ASCII, no spaces, at most "
                                          f"{MAX_ID_CHARS} characters)")
    unionid: str | None = None
    raw_unionid = data.get("unionid")
    blank = isinstance(raw_unionid, str) and not raw_unionid.strip()
    if raw_unionid is not None and not blank:
        unionid = _string(data, "unionid", ID_RE, f"a unionid (printable ASCII, no spaces, at "
                                                f"most {MAX_ID_CHARS} characters)")
    tokens = [
        _string(data, key, _TOKEN, f"a token (printable ASCII, 1 to {MAX_TOKEN_BYTES} bytes)")
        for key in ("access_token", "refresh_token")
    ]
    scope = _string(data, "scope", _SCOPE, "comma-separated scope names like snsapi_userinfo")
    if len(scope) > MAX_SCOPE_CHARS:
        raise BadLine(f"longer than {MAX_SCOPE_CHARS} characters", "scope")
    grant = Grant(
        id=0,
        appid=appid,
        openid=openid,
        unionid=unionid,
        scope=scope,
        access_token=tokens[0],
        refresh_token=tokens[1],
        access_expires_at=parse_time(data["access_expires_at"], "access_expires_at", now=now),
        refresh_issued_at=parse_time(data["refresh_issued_at"], "refresh_issued_at", now=now),
        state=ACTIVE,
    )
    # Unknown keys are named in a log line: only keys that are plain names are named.
    unknown = tuple(sorted({
        k if ID_RE.fullmatch(k) else "(a key that is not printable ASCII)"
        for k in set(data) - set(REQUIRED) - set(OPTIONAL)
    }))
    return grant, unknown


def parse_lines(
    lines: Iterable[str | bytes], *, appids: Iterable[str], now: datetime | None = None
) -> Iterator[Parsed]:
    """Every non-blank line, numbered from 1, parsed or with its error."""
    known = set(appids)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            grant, unknown = parse_line(raw, appids=known, now=now)
        except BadLine as e:
            yield Parsed(number, None, str(e), field=e.field)
            continue
        yield Parsed(number, grant, None, unknown)
