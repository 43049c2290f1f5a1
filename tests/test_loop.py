"""The process's event loop in a thread: threads hand it coroutines and wait; closing it ends
what still runs; what nobody waited for is logged without the objects involved."""

from __future__ import annotations

import asyncio
import threading

import pytest
from structlog.testing import capture_logs

from keeper.loop import EventLoop


def test_threads_run_coroutines_on_the_one_loop() -> None:
    loop = EventLoop()
    try:
        async def where() -> str:
            await asyncio.sleep(0)
            return threading.current_thread().name

        names = set()
        callers = [threading.Thread(target=lambda: names.add(loop.run(where())))
                   for _ in range(4)]
        for c in callers:
            c.start()
        for c in callers:
            c.join(5)
        assert names == {"keeper-loop"}
    finally:
        loop.close()
    assert not loop.running


def test_the_loop_cannot_wait_for_itself() -> None:
    loop = EventLoop()
    try:
        async def inner() -> None:
            return None

        async def outer() -> None:
            loop.run(inner())

        with pytest.raises(RuntimeError, match="own thread"):
            loop.run(outer())
    finally:
        loop.close()


def test_closing_cancels_what_still_runs() -> None:
    loop = EventLoop()
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    future = loop.submit(forever())
    loop.close(timeout_s=5)
    assert cancelled.is_set() and future.cancelled()


def test_an_exception_nobody_awaited_is_logged_without_its_objects() -> None:
    """A callback's exception names neither its arguments nor the objects of the context (an
    HTTP response's repr holds its URL, and so a token)."""
    loop = EventLoop()
    secret = "refresh_token=SECRET-TOKEN"

    class Response:
        def __repr__(self) -> str:
            return f"<ClientResponse(https://api.weixin.qq.com/sns?{secret})>"

    def broken(_response: Response) -> None:
        raise ValueError("bad")

    try:
        with capture_logs() as logs:
            loop.loop.call_soon_threadsafe(broken, Response())
            loop.run(asyncio.sleep(0.05))
    finally:
        loop.close()
    (line,) = [entry for entry in logs if entry["event"] == "loop.error"]
    assert line["error"] == "ValueError" and secret not in repr(line)
