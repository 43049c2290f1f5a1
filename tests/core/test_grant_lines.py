"""Import lines: validated field by field; errors never echo a token."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from keeper.core.grant_lines import (
    MAX_LINE_BYTES,
    BadLine,
    parse_line,
    parse_lines,
    parse_time,
)

GOOD = {
    "appid": "wx1", "openid": "o1", "access_token": "ACCESS-SECRET-1",
    "refresh_token": "REFRESH-SECRET-1", "scope": "snsapi_userinfo",
    "access_expires_at": "2026-11-01T12:00:00+08:00", "refresh_issued_at": 1_760_000_000,
}


NOW = datetime(2026, 1, 1, tzinfo=UTC)


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


@pytest.mark.parametrize(("text", "field"), [
    (line(openid="o\ud800"), "openid"),
    (line(access_token="A\udfff"), "access_token"),
    (line(unionid="u\ud800"), "unionid"),
    (line(openid="o\x00"), "openid"),
    (line(openid="o 1"), "openid"),
    (line(openid="o" * 129), "openid"),
    (line(openid="\u5fae\u4fe1"), "openid"),
    (line(appid="wx1\x00"), "appid"),
    (line(refresh_token="R" * 513), "refresh_token"),
    (line(refresh_token="R\nS"), "refresh_token"),
    (line(scope="snsapi_base snsapi_userinfo"), "scope"),
    (line(scope="snsapi_base,"), "scope"),
    (line(refresh_issued_at="9999-12-31T23:59:59+00:00"), "refresh_issued_at"),
    (line(refresh_issued_at="9999-12-31T23:59:59-05:00"), "refresh_issued_at"),
    (line(access_expires_at="0001-01-01T00:00:00+01:00"), "access_expires_at"),
    (line(access_expires_at="0001-01-01T00:00:00Z"), "access_expires_at"),
    (line(access_expires_at=-62135596800), "access_expires_at"),
    (line(access_expires_at=253402300800), "access_expires_at"),
    (line(access_expires_at=10**400), "access_expires_at"),
    (line(refresh_issued_at=1e308), "refresh_issued_at"),
    (line(access_expires_at="2009-12-31T23:59:59Z"), "access_expires_at"),
    (line(access_expires_at="2027-01-03T00:00:00Z"), "access_expires_at"),
    (line(refresh_issued_at="2026-01-03T00:00:00Z"), "refresh_issued_at"),
    (line(access_expires_at="2026-01-01T00:00:00+08:00" + " " * 80), "access_expires_at"),
    (line(access_expires_at=True), "access_expires_at"),
    (line(openid=...), "openid"),
])
def test_a_bad_field_is_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(BadLine) as e:
        parse_line(text, appids={"wx1"}, now=NOW)
    assert e.value.field == field and field in str(e.value)
    assert "SECRET" not in str(e.value)


@pytest.mark.parametrize("special", ["NaN", "Infinity", "-Infinity"])
def test_numbers_json_should_not_have_are_refused(special: str) -> None:
    text = line(access_expires_at=0).replace('"access_expires_at": 0',
                                             f'"access_expires_at": {special}')
    with pytest.raises(BadLine, match="access_expires_at"):
        parse_line(text, appids={"wx1"}, now=NOW)


@pytest.mark.parametrize(("raw", "message"), [
    ("[" * 100_000, "longer than 64 KiB"),
    ("[" * 30_000, "nested too deeply"),
    ('{"a":' * 12_000, "nested too deeply"),
    (b'{"appid": "wx1\xff"}', "not UTF-8"),
    ("x" * (MAX_LINE_BYTES + 1), "longer than 64 KiB"),
    ("\ud800", "not valid Unicode"),
    ('{"n": ' + "9" * 5000 + "}", "not valid JSON"),
])
def test_lines_that_are_not_json_objects_are_refused_whole(raw: str | bytes, message: str) -> None:
    with pytest.raises(BadLine, match=message) as e:
        parse_line(raw, appids={"wx1"}, now=NOW)
    assert e.value.field is None


def test_times_inside_the_window_are_taken() -> None:
    g, _ = parse_line(line(access_expires_at="2026-12-31T00:00:00Z",
                           refresh_issued_at="2026-01-01T12:00:00+00:00"),
                      appids={"wx1"}, now=NOW)
    assert g.access_expires_at == datetime(2026, 12, 31, tzinfo=UTC)
    assert g.refresh_issued_at == datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_a_token_of_512_bytes_and_an_id_of_128_are_taken() -> None:
    g, _ = parse_line(line(access_token="A" * 512, openid="o" * 128, unionid=" "),
                      appids={"wx1"}, now=NOW)
    assert len(g.access_token) == 512 and len(g.openid) == 128 and g.unionid is None


def test_unknown_keys_that_are_not_plain_names_are_not_echoed() -> None:
    _, unknown = parse_line(json.dumps({**GOOD, "ACCESS-SECRET-2 x": 1, "k\ud800": 2}),
                            appids={"wx1"})
    assert unknown == ("(a key that is not printable ASCII)",)


def test_byte_lines_are_parsed_like_text_lines() -> None:
    parsed = list(parse_lines([line().encode(), b"\xff\n", b"  \n"], appids={"wx1"}, now=NOW))
    assert [(p.line, p.grant is not None) for p in parsed] == [(1, True), (2, False)]
