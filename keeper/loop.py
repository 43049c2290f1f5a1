"""The process's event loop, in a daemon thread of its own: the sweep's WeChat calls run on it
as tasks, and threads hand it coroutines and wait for their results."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog
import uvloop

log = structlog.get_logger(__name__)

T = TypeVar("T")


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What the loop could not hand to anyone (a callback's exception, a task nobody awaited):
    its message and the exception's type only. asyncio's own handler prints the context's
    objects, and an HTTP response's ``repr`` holds its URL, which holds tokens."""
    error = context.get("exception")
    # Up to the first object: asyncio's own loop writes a callback's arguments into it.
    message = re.split(r"[(<]", str(context.get("message", "")), maxsplit=1)[0].strip()
    log.error("loop.error", message=message[:120],
              error=type(error).__name__ if error is not None else None)


class EventLoop:
    """One event loop (uvloop, as uvicorn's) in a daemon thread, started on first use."""

    def __init__(self, name: str = "keeper-loop") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started if it was not."""
        with self._lock:
            if self._loop is None:
                loop = uvloop.new_event_loop()
                loop.set_exception_handler(_quiet)
                started = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(loop, started),
                                                name=self.name, daemon=True)
                self._thread.start()
                started.wait()
                self._loop = loop
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; its future, for any thread to wait on."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (from a thread other than the
        loop's: the loop cannot wait for itself)."""
        if self._thread is not None and threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("EventLoop.run called on the loop's own thread")
        return self.submit(coro).result()

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._loop.is_closed()

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and wait for its thread (up to
        ``timeout_s``)."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None or loop.is_closed():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if thread.is_alive():
            with contextlib.suppress(TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout_s)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)
