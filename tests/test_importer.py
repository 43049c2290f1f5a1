"""Import lines: validated field by field; errors never echo a token."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from keeper.importer import BadLine, parse_line, parse_lines, parse_time

GOOD = {
    "appid": "wx1", "openid": "o1", "access_token": "ACCESS-SECRET-1",
    "refresh_token": "REFRESH-SECRET-1", "scope": "snsapi_userinfo",
    "access_expires_at": "2026-11-01T12:00:00+08:00", "refresh_issued_at": 1_760_000_000,
}


def line(**changes: object) -> str:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...})


def test_a_good_line_becomes_a_grant() -> None:
    g, unknown = parse_line(line(unionid="u1"), appids={"wx1"})
    assert (g.appid, g.openid, g.unionid) == ("wx1", "o1", "u1")
    assert g.access_expires_at == datetime(2026, 11, 1, 4, 0, tzinfo=UTC)
    assert g.refresh_issued_at == datetime.fromtimestamp(1_760_000_000, UTC)
    assert unknown == ()


def test_times_take_iso_with_offset_or_unix_seconds() -> None:
    assert parse_time("2026-11-01T00:00:00Z", "t") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_time(0, "t") == datetime(1970, 1, 1, tzinfo=UTC)
    with pytest.raises(BadLine, match="offset"):
        parse_time("2026-11-01T00:00:00", "t")


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (line(openid=...), "missing openid"),
    (line(access_token=""), "missing access_token"),
    (line(appid="wx-other"), "not configured"),
    (line(refresh_issued_at="yesterday"), "refresh_issued_at"),
    (line(scope=5), "scope"),
    (line(refresh_token=["REFRESH-SECRET-1"]), "refresh_token"),
])
def test_bad_lines_say_why_without_echoing_tokens(text: str, message: str) -> None:
    with pytest.raises(BadLine, match=message) as e:
        parse_line(text, appids={"wx1"})
    assert "SECRET" not in str(e.value)


def test_lines_are_numbered_and_blank_lines_skipped() -> None:
    parsed = list(parse_lines([line(), "\n", "oops", line(openid="o2")], appids={"wx1"}))
    assert [(p.line, p.error is None) for p in parsed] == [(1, True), (3, False), (4, True)]


def test_unknown_keys_are_reported() -> None:
    _, unknown = parse_line(line(expires_in=7200), appids={"wx1"})
    assert unknown == ("expires_in",)
