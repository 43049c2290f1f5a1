"""The WeChat client over real loopback HTTP: every answer classified, no secret in errors."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keeper.core import errcodes
from keeper.errors import (
    AppConfigRejected,
    BadCode,
    KeeperBugAnswer,
    NoProfile,
    QuotaExceeded,
    ReauthRequired,
    StaleAccessToken,
    TransientApiError,
)
from keeper.wechat.client import PATHS, WeChatClient, classify, request_path
from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, SECRET

RT, AT = "refresh-SECRET-token-1", "access-SECRET-token-1"


@pytest.fixture
def client(sim: Simulator) -> Iterator[WeChatClient]:
    now = time.time()
    sim.add_grant(appid=APPID, openid="o1", access_token=AT, refresh_token=RT,
                  access_expires_at=now + 3600, refresh_issued_at=now - 86400, unionid="u1")
    c = WeChatClient(api_base=sim.url, connect_timeout_s=1, read_timeout_s=0.3)
    yield c
    c.close()


KIND_CLASS = {
    errcodes.REAUTH: ReauthRequired, errcodes.BAD_CODE: BadCode,
    errcodes.STALE_TOKEN: StaleAccessToken, errcodes.PROFILE_ONLY: NoProfile,
    errcodes.APP: AppConfigRejected, errcodes.QUOTA: QuotaExceeded,
    errcodes.TRANSIENT: TransientApiError, errcodes.BUG: KeeperBugAnswer,
}
ROWS = [(endpoint, code, row.kind) for row in errcodes.TABLE for code in row.codes
        for endpoint in row.endpoints]


@pytest.mark.parametrize(("endpoint", "errcode", "kind"), ROWS)
def test_every_row_of_the_errcode_table_has_its_class(
    endpoint: str, errcode: int, kind: str
) -> None:
    error = classify(endpoint, errcode, "msg")
    assert type(error) is KIND_CLASS[kind] and error.errcode == errcode
    assert error.endpoint == endpoint


@pytest.mark.parametrize("endpoint", errcodes.ENDPOINTS)
@pytest.mark.parametrize("errcode", [99999, 12345, 0x7FFFFFFF, -2])
def test_an_unknown_errcode_is_transient_and_named(endpoint: str, errcode: int) -> None:
    error = classify(endpoint, errcode, "whatever")
    assert type(error) is TransientApiError and "unknown errcode" in str(error)


def test_the_table_has_no_contradiction() -> None:
    seen: dict[tuple[str, int], str] = {}
    for row in errcodes.TABLE:
        assert row.kind in errcodes.KINDS and row.meaning and row.action
        for code in row.codes:
            for endpoint in row.endpoints:
                assert (endpoint, code) not in seen, (endpoint, code)
                seen[(endpoint, code)] = row.kind
    # The codes whose class matters most, by class.
    for code in (40030, 42002, 42007):
        assert all(seen[(e, code)] == errcodes.REAUTH for e in errcodes.ENDPOINTS)
    for code in (40013, 40125, 40164, 48004):
        assert seen[("refresh", code)] == errcodes.APP
    for code in (40002, 40035, 40097, *range(41001, 41010)):
        assert seen[("refresh", code)] == errcodes.BUG
    for code in (48001, 50001, 50002):
        assert seen[("userinfo", code)] == errcodes.PROFILE_ONLY
        assert seen[("refresh", code)] == errcodes.TRANSIENT



def test_quota_errors_are_transient_and_reauth_ones_are_not() -> None:
    assert isinstance(classify("refresh", 45011), TransientApiError)
    assert not isinstance(classify("refresh", 40030), TransientApiError)
    assert classify("refresh", 42002).reason == "refresh_token_expired"  # type: ignore[attr-defined]


def test_refresh_over_http_returns_the_tokens(client: WeChatClient) -> None:
    answer = client.refresh(APPID, RT)
    assert answer.refresh_token == RT and answer.access_token == AT
    assert answer.openid == "o1" and answer.expires_in_s == 7200


def test_refresh_never_sends_the_secret(client: WeChatClient, sim: Simulator) -> None:
    client.refresh(APPID, RT)
    assert sim.stats()["endpoints"]["refresh"]["secret_sent"] == 0  # type: ignore[index]


def test_code_exchange_and_its_refusals(client: WeChatClient, sim: Simulator) -> None:
    code = sim.issue_code(appid=APPID, openid="o9", unionid="u9")
    answer = client.exchange_code(APPID, SECRET, code)
    assert answer.openid == "o9" and answer.unionid == "u9"
    with pytest.raises(BadCode) as used:
        client.exchange_code(APPID, SECRET, code)
    assert used.value.errcode == 40163
    with pytest.raises(AppConfigRejected):
        client.exchange_code(APPID, "wrong-secret", sim.issue_code(appid=APPID, openid="o8"))


def test_userinfo_and_auth(client: WeChatClient) -> None:
    profile = client.userinfo(AT, "o1", "zh_CN")
    assert profile["openid"] == "o1" and "headimgurl" in profile
    client.check(AT, "o1")
    with pytest.raises(StaleAccessToken):
        client.check("not-a-token", "o1")


@pytest.mark.parametrize(("answer", "detail"), [
    ("502", "HTTP 502"), ("html", "HTML"), ("truncated", "not a JSON object"),
    ("timeout", "timeout"), (-1, "busy"),
])
def test_garbled_answers_are_transient(client: WeChatClient, sim: Simulator, answer: object,
                                       detail: str) -> None:
    sim.force("refresh", answer)  # type: ignore[arg-type]
    with pytest.raises(TransientApiError, match=detail) as e:
        client.refresh(APPID, RT)
    assert RT not in str(e.value) and e.value.__cause__ is None


def test_network_errors_carry_no_url_and_no_token() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    c = WeChatClient(api_base=f"http://127.0.0.1:{port}", connect_timeout_s=0.5,
                     read_timeout_s=0.5)
    with pytest.raises(TransientApiError) as e:
        c.refresh(APPID, RT)
    text = f"{e.value!r} {e.value} {e.value.__context__!r}"
    assert RT not in text and "refresh_token=" not in text
    assert e.value.__context__ is None and e.value.__cause__ is None


class HugeBody(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        try:
            for _ in range(2000):
                self.wfile.write(b"x" * 1024)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A one-off loopback server answering with ``handler``; its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_bodies_are_read_with_a_size_cap() -> None:
    with serving(HugeBody) as url:
        c = WeChatClient(api_base=url, connect_timeout_s=1, read_timeout_s=2,
                         max_body_bytes=64 * 1024)
        with pytest.raises(TransientApiError, match="larger than"):
            c.refresh(APPID, RT)


class EchoingWeChat(BaseHTTPRequestHandler):
    """A WeChat that repeats the request's query (tokens included) in its errmsg."""

    def do_GET(self) -> None:
        body = ('{"errcode": 40030, "errmsg": "invalid refresh_token ' + self.path.split("?")[1]
                + '"}').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_errmsg_echoing_a_token_is_scrubbed() -> None:
    with serving(EchoingWeChat) as url:
        c = WeChatClient(api_base=url, connect_timeout_s=1, read_timeout_s=2)
        with pytest.raises(ReauthRequired) as e:
            c.refresh(APPID, RT)
        assert RT not in str(e.value) and "invalid refresh_token" in str(e.value)


@given(st.dictionaries(st.sampled_from(["appid", "secret", "code", "grant_type", "refresh_token",
                                         "access_token", "openid", "lang"]), st.text()))
def test_a_query_is_what_urlencode_makes_of_it(params: dict[str, str]) -> None:
    assert request_path("refresh", params) == f"{PATHS['refresh']}?{urlencode(params)}"
