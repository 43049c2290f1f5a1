"""The handler threads' WeChat client: its calls are made on the event loop it is attached
to, with the threaded client's answers; without a loop it is the threaded client; a loop that
does not answer is a timeout, never a hang."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from keeper.api.loopclient import LoopClient
from keeper.errors import BadCode, TransientApiError
from keeper.wechat.client import WeChatClient
from keeper.wechat.simulator import Simulator
from tests.conftest import APPID, SECRET


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as uvicorn's is to the handler threads."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(timeout=5)
    running.close()


def client(sim: Simulator) -> LoopClient:
    return LoopClient(api_base=sim.url, connect_timeout_s=2, read_timeout_s=2)


def test_a_call_from_a_thread_is_made_on_the_attached_loop(
        sim: Simulator, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    c = client(sim)
    c.attach(loop)
    # Were the threaded client asked, this would fail the call.
    monkeypatch.setattr(WeChatClient, "call", lambda *a, **kw: pytest.fail("threaded call"))
    answer = c.exchange_code(APPID, SECRET, sim.issue_code(appid=APPID, openid="o1"))
    assert answer.openid == "o1"
    with pytest.raises(BadCode):  # WeChat's refusals are the threaded client's exceptions
        c.exchange_code(APPID, SECRET, "no-such-code")
    asyncio.run_coroutine_threadsafe(c.detach(), loop).result(5)
    assert c.aio._session is None


def test_without_a_loop_it_is_the_threaded_client(sim: Simulator) -> None:
    c = client(sim)
    answer = c.exchange_code(APPID, SECRET, sim.issue_code(appid=APPID, openid="o2"))
    assert answer.openid == "o2"
    c.close()


def test_a_call_the_loop_does_not_finish_in_time_is_a_timeout(
        loop: asyncio.AbstractEventLoop) -> None:
    with socket.socket() as silent:  # takes the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        c = LoopClient(api_base=f"http://127.0.0.1:{silent.getsockname()[1]}",
                       connect_timeout_s=2, read_timeout_s=2)
        c.attach(loop)
        c.wait_s = 0.2
        with pytest.raises(TransientApiError, match="timeout"):
            c.refresh(APPID, "some-refresh-token")
        asyncio.run_coroutine_threadsafe(c.detach(), loop).result(5)
