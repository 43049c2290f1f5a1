"""The WeChat client of ``keeper serve``'s handler threads, whose calls the event loop makes.

The token desk and the code exchange are threaded code (the store blocks), and ``requests``
cost about 1.5 ms of CPU a call in a handler thread, a third of an on-demand refresh. Here
each call is made by :class:`~keeper.wechat.aio.AsyncWeChatClient` on the server process's
event loop (about 0.3 ms); the handler thread waits for its answer without using the CPU.
Answers, exceptions and metrics are the async client's, which are the threaded client's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from keeper.errors import TransientApiError
from keeper.wechat.aio import AsyncWeChatClient
from keeper.wechat.client import WeChatClient

#: Beyond the client's own timeouts, how long a handler thread waits for the loop to answer
#: before it gives the call up (a loop that stopped, say): then the call timed out.
SLACK_S = 5.0


class LoopClient(WeChatClient):
    """A :class:`WeChatClient` whose :meth:`call` runs on an event loop once
    :meth:`attach` has named it (from a thread other than the loop's: the caller waits);
    before that, and after :meth:`detach`, the threaded client's own."""

    def __init__(self, *, api_base: str, connect_timeout_s: float,
                 read_timeout_s: float) -> None:
        super().__init__(api_base=api_base, connect_timeout_s=connect_timeout_s,
                         read_timeout_s=read_timeout_s)
        self.aio = AsyncWeChatClient(api_base=api_base, connect_timeout_s=connect_timeout_s,
                                     read_timeout_s=read_timeout_s)
        # A call's connect, then reads of an answer of at most 256 KiB.
        self.wait_s = connect_timeout_s + 2 * read_timeout_s + SLACK_S
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def detach(self) -> None:
        """On the loop, once no handler calls any more: the async client's pool is closed."""
        self._loop = None
        await self.aio.close()

    def call(self, endpoint: str, params: dict[str, str], *, appid: str = "") -> dict[str, Any]:
        loop = self._loop
        if loop is None:
            return super().call(endpoint, params, appid=appid)
        future = asyncio.run_coroutine_threadsafe(
            self.aio.call(endpoint, params, appid=appid), loop)
        try:
            return future.result(self.wait_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
        except concurrent.futures.CancelledError:  # the loop is shutting down
            pass
        raise TransientApiError(endpoint, None, "timeout")
