"""The WeChat OAuth2 client on an event loop: the four endpoints over ``aiohttp``.

The same surface and the same answers as :class:`keeper.wechat.client.WeChatClient`, as
coroutines: a :class:`TokenAnswer`, a dict, or an exception from :mod:`keeper.errors`, with
the same parsing, classification, body cap and metrics (the pure parts are
:mod:`keeper.wechat.client`'s). No ``aiohttp`` exception escapes and none is chained or left as
a context: their text and their ``request_info`` hold the URL, and the URL holds tokens, so
failures are raised after the ``except`` block has ended.

aiohttp over httpx by measurement: 64 calls in flight against the simulator at 50 ms on a
2-core machine, aiohttp cost 0.26-0.37 ms of CPU a call (0.26-0.31 on uvloop), httpx 1.7 ms
with its default pool and 6 ms with a pool of 64 (its pool's bookkeeping grows with the
requests waiting), 64 threads of ``requests`` 1.5-1.7 ms.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any

from keeper import __version__
from keeper.core.models import TokenAnswer
from keeper.errors import ApiError, TransientApiError
from keeper.metrics import process as metrics
from keeper.wechat.client import (
    MAX_BODY_BYTES,
    auth_answer,
    auth_params,
    code_params,
    parse_answer,
    refresh_params,
    request_path,
    token_answer,
    userinfo_params,
)

if TYPE_CHECKING:
    import aiohttp

_CHUNK = 16 * 1024


async def read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes | None:
    """The body, or ``None`` (the rest unread) once it is past ``max_bytes``.

    The caller closes an unfinished response, which closes its connection rather than
    reading on, so a hostile server cannot make keeper read or buffer more than
    ``max_bytes`` (aiohttp's own read buffer aside: 64 KiB).
    """
    length = resp.content_length
    if length is not None:
        # aiohttp's parser stops at Content-Length: read() cannot go past it.
        return None if length > max_bytes else await resp.read()
    chunks: list[bytes] = []
    size = 0
    while part := await resp.content.read(_CHUNK):
        size += len(part)
        if size > max_bytes:
            return None
        chunks.append(part)
    return b"".join(chunks)


@functools.cache
def _patient() -> type:
    """aiohttp's connection protocol, with a read timeout that gives up only after the loop
    has polled the sockets twice more.

    A process stopped past a read timeout (SIGSTOP, a paused VM) wakes with answers waiting in
    its sockets and the timeouts due; its first poll may see no socket at all (Linux
    interrupts epoll_wait on SIGCONT, and Python does not poll again once the poll's own
    deadline passed), so the timers run first. A call WeChat answered then must still be read:
    the answer may hold a rotated refresh token, the only one that works from then on. Any
    byte read meanwhile (or the answer's end) replaces or drops the timer that fired, and the
    timeout is void. aiohttp has no public hook for this: its private ``_on_read_timeout``
    and ``_read_timeout_handle`` are used, and tests/wechat/test_aio.py checks them (the
    version is pinned).
    """
    from aiohttp.client_proto import ResponseHandler

    class PatientHandler(ResponseHandler):
        def _on_read_timeout(self) -> None:
            fired = self._read_timeout_handle
            self._loop.call_soon(self._loop.call_soon, self._confirm_read_timeout, fired)

        def _confirm_read_timeout(self, fired: asyncio.TimerHandle | None) -> None:
            if fired is not None and self._read_timeout_handle is fired:
                super()._on_read_timeout()

    return PatientHandler


class AsyncWeChatClient:
    """WeChat's four endpoints as coroutines, for one event loop.

    Its connection pool (``max_connections`` at most, kept alive) belongs to the loop of the
    first call; :meth:`close` it on that loop. Timeouts mean what they mean to the threaded
    client: ``connect_timeout_s`` to open a connection, ``read_timeout_s`` between two reads.
    Asks for an uncompressed answer and never decompresses one (a gzip body WeChat sent
    unasked is malformed, not a bomb to inflate), follows no redirect, reads no proxy from
    the environment and keeps no cookie.
    """

    def __init__(
        self, *, api_base: str, connect_timeout_s: float, read_timeout_s: float,
        max_body_bytes: int = MAX_BODY_BYTES, max_connections: int = 100,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._headers = {"User-Agent": f"keeper/{__version__}", "Accept": "application/json",
                         "Accept-Encoding": "identity"}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def ready(self) -> None:
        """Make the connection pool (and import aiohttp) now, on the running loop, if it is not
        made yet: a caller that takes a quota permit first must not spend the permit's slack
        on that (a quarter of a second at the first call)."""
        self._http()

    def _http(self) -> aiohttp.ClientSession:
        session = self._session
        if session is not None and not session.closed:
            if asyncio.get_running_loop() is not self._loop:
                raise RuntimeError("an AsyncWeChatClient is used from one event loop only")
            return session
        # Imported on first use: a command that never calls WeChat does not pay the import
        # (a quarter of a second on the development machine).
        import aiohttp

        self._loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
        # Its protocol, with a read timeout that lets the sockets speak first (see _patient).
        connector._factory = functools.partial(_patient(), loop=self._loop)
        self._session = session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=None,
                                          sock_connect=self.connect_timeout_s,
                                          sock_read=self.read_timeout_s),
            headers=self._headers, cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False, trust_env=False, raise_for_status=False,
        )
        return session

    async def close(self) -> None:
        """Close the connection pool (on the loop it belongs to)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def call(self, endpoint: str, params: dict[str, str], *,
                   appid: str = "") -> dict[str, Any]:
        """GET one endpoint; the answer's JSON object on success (errcode absent or 0).

        Counted in ``keeper_wechat_calls_total`` by ``appid`` (the ``appid`` parameter of the
        code and refresh calls, else the one given), endpoint and outcome, and timed."""
        started = time.perf_counter()
        try:
            data = await self._call(endpoint, params)
        except ApiError as e:
            metrics.wechat_call(appid or params.get("appid", ""), endpoint, e,
                                time.perf_counter() - started)
            raise
        metrics.wechat_call(appid or params.get("appid", ""), endpoint, None,
                            time.perf_counter() - started)
        return data

    async def _call(self, endpoint: str, params: dict[str, str]) -> dict[str, Any]:
        failure: str | None = None
        status = 0
        body = b""
        content_type = ""
        http = self._http()
        import aiohttp  # loaded by _http: a look-up in sys.modules
        from yarl import URL

        try:
            # encoded=True: the query is urlencode()d already; yarl neither re-parses nor
            # re-quotes it (a tenth of a call's CPU otherwise).
            url = URL(f"{self.api_base}{request_path(endpoint, params)}", encoded=True)
            async with http.get(url, allow_redirects=False) as resp:
                status = resp.status
                content_type = resp.headers.get("Content-Type", "")
                capped = await read_capped(resp, self.max_body_bytes)
                if capped is None:
                    resp.close()  # the connection goes, with whatever it still had to send
                    failure = f"answer larger than {self.max_body_bytes} bytes"
                else:
                    body = capped
        except TimeoutError:  # aiohttp's ServerTimeoutError is one too
            failure = "timeout"
        except (aiohttp.ClientConnectionError, OSError):
            failure = "connection failed"
        except (aiohttp.ClientError, ValueError) as e:
            failure = f"request failed ({type(e).__name__})"
        if failure is not None:
            raise TransientApiError(endpoint, None, failure)
        return parse_answer(endpoint, status, content_type, body, params)

    async def exchange_code(self, appid: str, secret: str, code: str) -> TokenAnswer:
        """``/sns/oauth2/access_token``. Never retried by keeper: a code is single-use."""
        return token_answer("code", await self.call("code", code_params(appid, secret, code)))

    async def refresh(self, appid: str, refresh_token: str) -> TokenAnswer:
        """``/sns/oauth2/refresh_token``. The AppSecret is not needed and never sent."""
        data = await self.call("refresh", refresh_params(appid, refresh_token))
        return token_answer("refresh", data)

    async def check(self, access_token: str, openid: str, *, appid: str = "") -> None:
        """``/sns/auth``: returns when the access token is valid, raises otherwise.

        Valid only for an explicit ``errcode`` 0: ``{}`` is a malformed answer, not a yes.
        ``appid``: the grant's app, for the metrics (the call itself does not send it).
        """
        auth_answer(await self.call("auth", auth_params(access_token, openid), appid=appid))

    async def userinfo(self, access_token: str, openid: str, lang: str, *,
                       appid: str = "") -> dict[str, Any]:
        """``/sns/userinfo``: the profile answer as WeChat gave it (``appid``: as for
        :meth:`check`)."""
        return await self.call("userinfo", userinfo_params(access_token, openid, lang),
                               appid=appid)
