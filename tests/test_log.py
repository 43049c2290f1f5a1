"""keeper's log lines: the direct path of a busy line writes what structlog would, redacted the
same way, and steps aside wherever structlog's own path is wanted (a test's capture, another
level, a pretty console)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import keeper.log
from keeper.log import DirectLogger, configure, register_secret, set_level

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_lines(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
               ) -> Iterator[Lines]:
    """A function that configures keeper's logging for JSON lines on (captured) stderr the
    first time it is called, and returns every line written since its last call, parsed. The
    configuration before the test is put back after it."""
    root = logging.getLogger()
    saved = list(root.handlers), root.level, structlog.get_config()
    monkeypatch.setattr(keeper.log, "_direct", None)  # what configure sets
    monkeypatch.setattr(keeper.log, "_known_secrets", frozenset())
    configured = False

    def lines() -> list[dict[str, Any]]:
        nonlocal configured
        if not configured:  # in the test's body: pytest gives the setup a stderr of its own
            configure("info", pretty=False)
            configured = True
        return [json.loads(line) for line in capsys.readouterr().err.splitlines()]

    yield lines
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    structlog.configure(**saved[2])


FIELDS = {"method": "GET", "route": "/v1/apps/{appid}/users/{openid}/token", "status": 200,
          "ms": 1.25, "key_name": None, "appid": "wx1", "openid": "o-1"}


def test_a_direct_line_is_the_line_structlog_writes(json_lines: Lines) -> None:
    assert json_lines() == []
    structlog.get_logger("keeper.api").info("api.request", **FIELDS)
    DirectLogger("keeper.api").info("api.request", **FIELDS)
    via_structlog, direct = json_lines()
    assert direct.pop("timestamp").endswith("Z") and via_structlog.pop("timestamp")
    assert list(direct.items()) == list(via_structlog.items())  # the same keys in one order
    assert direct["logger"] == "keeper.api" and direct["level"] == "info"


@pytest.mark.parametrize("value", [
    "plain", "ünïcödé \u2028 \x00\x1f \"quoted\" back\\slash", "", 0, -7, 10**30, 1.5, -0.0,
    1e300, 2.5e-8, float("nan"), float("inf"), True, False, None, {"a": ["b", 1]}, ("t", 2),
    b"bytes", object(),
])
def test_a_direct_line_is_the_line_structlog_writes_whatever_the_value(
    json_lines: Lines, capsys: pytest.CaptureFixture[str], value: object,
) -> None:
    """Checked on the text, not the parsed line: the same bytes, the time aside."""
    assert json_lines() == []
    structlog.get_logger("keeper.api").info("api.test", value=value, n=1)
    DirectLogger("keeper.api").info("api.test", value=value, n=1)
    via_structlog, direct = capsys.readouterr().err.splitlines()
    stamp = re.compile(r'"timestamp": "[^"]+"')
    assert stamp.sub("", direct) == stamp.sub("", via_structlog)
    assert stamp.search(direct)


def test_an_exception_in_a_direct_line_is_rendered_as_structlog_renders_it(
    json_lines: Lines,
) -> None:
    assert json_lines() == []
    try:
        raise ValueError("boom")
    except ValueError:
        DirectLogger("keeper.api").info("api.test", exc_info=True)
    [line] = json_lines()
    assert "ValueError: boom" in line["exception"] and "exc_info" not in line


def test_a_direct_line_is_redacted_as_every_line_is(json_lines: Lines) -> None:
    assert json_lines() == []
    register_secret("the-app-secret")
    fields = {"token": "t-1", "detail": "?access_token=abc&x=1", "body": '{"code": "c-1"}',
              "said": "it was the-app-secret", "where": "12:00"}
    structlog.get_logger("keeper.api").info("api.test", **fields)
    DirectLogger("keeper.api").info("api.test", **fields)
    via_structlog, direct = json_lines()
    assert {k: direct[k] for k in fields} == {k: via_structlog[k] for k in fields} == {
        "token": "[redacted]", "detail": "?access_token=[redacted]&x=1",
        "body": '{"code": "[redacted]"}', "said": "it was [redacted]", "where": "12:00"}


def test_a_direct_line_follows_the_level_set_at_run_time(json_lines: Lines) -> None:
    assert json_lines() == []
    log = DirectLogger("keeper.api")
    set_level("warning")
    log.info("api.request", **FIELDS)
    assert json_lines() == []
    set_level("info")
    log.info("api.request", **FIELDS)
    assert [line["event"] for line in json_lines()] == ["api.request"]


def test_a_tests_capture_sees_direct_lines_and_nothing_is_written(json_lines: Lines) -> None:
    assert json_lines() == []
    with capture_logs() as captured:
        DirectLogger("keeper.api").info("api.request", status=200)
    assert captured == [{"status": 200, "event": "api.request", "log_level": "info"}]
    assert json_lines() == []
    DirectLogger("keeper.api").info("api.request", status=200)  # keeper's path again after
    assert [line["status"] for line in json_lines()] == [200]


def test_other_levels_are_structlogs_own(json_lines: Lines) -> None:
    assert json_lines() == []
    DirectLogger("keeper.api").warning("api.test", n=1)
    [line] = json_lines()
    assert (line["event"], line["level"], line["n"]) == ("api.test", "warning", 1)


def test_a_pretty_console_takes_structlogs_path(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level, structlog.get_config()
    monkeypatch.setattr(keeper.log, "_direct", None)
    try:
        configure("info", pretty=True)
        DirectLogger("keeper.api").info("api.request", status=200)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.configure(**saved[2])
    err = capsys.readouterr().err
    assert "api.request" in err and not err.lstrip().startswith("{")
