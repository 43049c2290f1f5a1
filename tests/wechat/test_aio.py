"""The WeChat client on an event loop, over real loopback HTTP: the threaded client's answers,
every hostile body classified, no secret in errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, TypeVar

import pytest

from bench.env import Sim
from bench.seed import APPID as SIM_APPID
from bench.seed import grant_rows
from keeper.errors import (
    AppConfigRejected,
    BadCode,
    MalformedAnswer,
    ReauthRequired,
    StaleAccessToken,
    TransientApiError,
)
from keeper.metrics import process as metrics
from keeper.wechat.aio import AsyncWeChatClient
from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, SECRET
from tests.wechat.test_client import EchoingWeChat, HugeBody, serving

RT, AT = "refresh-SECRET-token-1", "access-SECRET-token-1"
T = TypeVar("T")


def run(base: str, work: Callable[[AsyncWeChatClient], Awaitable[T]], **kw: Any) -> T:
    """``work(client)`` on a loop of its own, the client closed after."""
    options = {"connect_timeout_s": 1, "read_timeout_s": 0.3, **kw}

    async def main() -> T:
        client = AsyncWeChatClient(api_base=base, **options)
        try:
            return await work(client)
        finally:
            await client.close()

    return asyncio.run(main())


@pytest.fixture
def base(sim: Simulator) -> str:
    now = time.time()
    sim.add_grant(appid=APPID, openid="o1", access_token=AT, refresh_token=RT,
                  access_expires_at=now + 3600, refresh_issued_at=now - 86400, unionid="u1")
    return sim.url


def raised(base: str, work: Callable[[AsyncWeChatClient], Awaitable[Any]],
           **kw: Any) -> BaseException:
    async def catch(client: AsyncWeChatClient) -> BaseException:
        try:
            await work(client)
        except Exception as e:
            return e
        raise AssertionError("no exception")

    return run(base, catch, **kw)


def assert_no_secret(e: BaseException) -> None:
    """Nothing of the request in the error: its text, repr, cause and context."""
    text = f"{e!r} {e} {e.__context__!r} {e.__cause__!r}"
    for secret in (RT, AT, SECRET, "refresh_token=", "access_token="):
        assert secret not in text
    assert e.__cause__ is None and e.__context__ is None


def test_refresh_returns_the_tokens_and_never_sends_the_secret(base: str,
                                                              sim: Simulator) -> None:
    answer = run(base, lambda c: c.refresh(APPID, RT))
    assert answer.refresh_token == RT and answer.access_token == AT
    assert answer.openid == "o1" and answer.expires_in_s == 7200
    assert sim.stats()["endpoints"]["refresh"]["secret_sent"] == 0  # type: ignore[index]


def test_many_calls_share_kept_alive_connections(base: str) -> None:
    async def many(c: AsyncWeChatClient) -> set[str]:
        answers = await asyncio.gather(*(c.refresh(APPID, RT) for _ in range(40)))
        return {a.access_token for a in answers}

    assert run(base, many, max_connections=8) == {AT}


def test_code_exchange_and_its_refusals(base: str, sim: Simulator) -> None:
    code = sim.issue_code(appid=APPID, openid="o9", unionid="u9")

    async def exchange(c: AsyncWeChatClient) -> tuple[Any, BaseException, BaseException]:
        answer = await c.exchange_code(APPID, SECRET, code)
        errors = []
        for secret, used in ((SECRET, code),
                             ("wrong-secret", sim.issue_code(appid=APPID, openid="o8"))):
            try:
                await c.exchange_code(APPID, secret, used)
            except Exception as e:
                errors.append(e)
        return answer, errors[0], errors[1]

    answer, reused, wrong = run(base, exchange)
    assert answer.openid == "o9" and answer.unionid == "u9"
    assert isinstance(reused, BadCode) and reused.errcode == 40163
    assert isinstance(wrong, AppConfigRejected)
    assert code not in str(reused) and "wrong-secret" not in str(wrong)


def test_userinfo_and_auth(base: str) -> None:
    async def both(c: AsyncWeChatClient) -> dict[str, Any]:
        profile = await c.userinfo(AT, "o1", "zh_CN", appid=APPID)
        await c.check(AT, "o1", appid=APPID)
        return profile

    profile = run(base, both)
    assert profile["openid"] == "o1" and "headimgurl" in profile
    stale = raised(base, lambda c: c.check("not-a-token", "o1"))
    assert isinstance(stale, StaleAccessToken)


@pytest.mark.parametrize(("answer", "detail"), [
    ("502", "HTTP 502"), ("html", "HTML"), ("truncated", "not a JSON object"),
    ("timeout", "timeout"), (-1, "busy"), (99999, "unknown errcode"),
])
def test_garbled_answers_are_transient(base: str, sim: Simulator, answer: object,
                                       detail: str) -> None:
    sim.force("refresh", answer)  # type: ignore[arg-type]
    e = raised(base, lambda c: c.refresh(APPID, RT))
    assert isinstance(e, TransientApiError) and detail in str(e)
    assert_no_secret(e)


def test_a_dead_token_is_reauth_and_names_no_token(base: str, sim: Simulator) -> None:
    sim.force("refresh", 40030)
    e = raised(base, lambda c: c.refresh(APPID, RT))
    assert isinstance(e, ReauthRequired) and e.errcode == 40030
    assert_no_secret(e)


def test_connection_refused_carries_no_url_and_no_token() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    e = raised(f"http://127.0.0.1:{port}", lambda c: c.refresh(APPID, RT),
               connect_timeout_s=0.5, read_timeout_s=0.5)
    assert isinstance(e, TransientApiError) and e.detail == "connection failed"
    assert_no_secret(e)


def test_a_server_that_hangs_up_is_a_connection_failure() -> None:
    class _HangUp(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    with serving(_HangUp) as url:
        e = raised(url, lambda c: c.refresh(APPID, RT))
    assert isinstance(e, TransientApiError) and e.detail == "connection failed"
    assert_no_secret(e)


class _HugeLength(BaseHTTPRequestHandler):
    """Announces a body past the cap (and sends some of it)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(10 * 1024 * 1024))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(b"{" + b" " * 4096)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("handler", [HugeBody, _HugeLength], ids=["streamed", "announced"])
def test_bodies_are_read_with_a_size_cap(handler: type[BaseHTTPRequestHandler]) -> None:
    with serving(handler) as url:
        e = raised(url, lambda c: c.refresh(APPID, RT), read_timeout_s=2,
                   max_body_bytes=64 * 1024)
    assert isinstance(e, TransientApiError) and "larger than" in str(e)
    assert_no_secret(e)


def test_an_errmsg_echoing_a_token_is_scrubbed() -> None:
    with serving(EchoingWeChat) as url:
        e = raised(url, lambda c: c.refresh(APPID, RT), read_timeout_s=2)
    assert isinstance(e, ReauthRequired) and "invalid refresh_token" in str(e)
    assert RT not in str(e)


def test_an_answer_that_is_not_json_is_malformed() -> None:
    class _Text(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"[1, 2]"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving(_Text) as url:
        e = raised(url, lambda c: c.refresh(APPID, RT))
    assert isinstance(e, MalformedAnswer)


def test_calls_are_counted_by_app_endpoint_and_outcome(base: str, sim: Simulator) -> None:
    def count(outcome: str) -> float:
        return metrics.WECHAT_CALLS.labels(APPID, "refresh", outcome)._value.get()  # type: ignore[no-any-return]

    was = metrics.enabled()
    metrics.enable()
    try:
        ok, timeouts = count("ok"), count("timeout")
        run(base, lambda c: c.refresh(APPID, RT))
        sim.force("refresh", "timeout")
        raised(base, lambda c: c.refresh(APPID, RT))
    finally:
        metrics.enable(was)
    assert count("ok") == ok + 1 and count("timeout") == timeouts + 1


def test_a_client_serves_one_event_loop() -> None:
    client = AsyncWeChatClient(api_base="http://127.0.0.1:9", connect_timeout_s=0.2,
                               read_timeout_s=0.2)

    async def first() -> None:
        with pytest.raises(TransientApiError):
            await client.refresh(APPID, RT)

    async def second() -> None:
        with pytest.raises(RuntimeError, match="one event loop"):
            await client.refresh(APPID, RT)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(first())
        asyncio.run(second())
        loop.run_until_complete(client.close())
    finally:
        loop.close()


@pytest.mark.e2e
def test_answers_that_came_while_the_process_was_stopped_are_read() -> None:
    """Given calls in flight when the process is stopped (SIGSTOP) for longer than the read
    timeout, and WeChat answering meanwhile, when the process is continued, then the answers
    waiting in its sockets are read, not timed out: they may hold rotated refresh tokens."""
    sim = Sim(500.0, None)  # WeChat in a process of its own: it answers while this one stops
    try:
        rows = grant_rows(4, time.time())
        sim.seed(rows)

        async def calls(c: AsyncWeChatClient) -> list[Any]:
            await c.refresh(SIM_APPID, rows[0]["refresh_token"])  # a connection is open
            pending = [asyncio.ensure_future(c.refresh(SIM_APPID, r["refresh_token"]))
                       for r in rows]
            await asyncio.sleep(0.05)  # the requests are sent
            subprocess.Popen(["/bin/sh", "-c", f"kill -STOP {os.getpid()}; sleep 2; "
                              f"kill -CONT {os.getpid()}"])
            return await asyncio.gather(*pending, return_exceptions=True)

        answers = run(sim.url, calls, read_timeout_s=1)
    finally:
        sim.close()
    assert [type(a).__name__ for a in answers] == ["TokenAnswer"] * 4, answers


def test_ready_makes_the_pool_before_any_call() -> None:
    """A caller that takes a quota permit first calls ready() before it: the first call must
    not spend the permit's slack importing aiohttp and making the pool."""
    async def check(c: AsyncWeChatClient) -> bool:
        c.ready()
        return c._session is not None and not c._session.closed

    assert run("http://127.0.0.1:9", check)
