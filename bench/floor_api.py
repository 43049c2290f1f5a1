"""``python -m bench api``'s floor: the least a token look-up costs on keeper's own stack.

A bare Starlette app under uvicorn (the bench starts it with keeper's loop, HTTP parser and
process count) answering ``GET /v1/apps/{appid}/users/{openid}/token`` with one row of the
bench's database: the grants table's stored access token by appid and openid, read by a plain
query through sqlite3 or psycopg and returned as JSON. No keeper code, no API key check, no
decryption, no log line, no metrics: what is left is the stack and the read, so keeper's
figures over these say what keeper's own work costs.

The database comes from ``$FLOOR_DATABASE_URL`` (the bench's SQLAlchemy URL, SQLite or
PostgreSQL through psycopg).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SQL = "SELECT access_token FROM grants WHERE appid = {p} AND openid = {p}"
# As many PostgreSQL connections a process as keeper's fast path keeps (its TokenReader's).
PG_CONNECTIONS = 4


class Reader:
    """One row by appid and openid: SQLite read inline on the event loop (a read-only file,
    as keeper's fast path reads it), PostgreSQL on a few autocommit ``AsyncConnection``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite: sqlite3.Connection | None = None
        self.idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()

    async def open(self) -> None:
        if self.url.startswith("sqlite:///"):
            path = self.url.removeprefix("sqlite:///")
            self.sqlite = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                          check_same_thread=False)
            return
        conninfo = self.url.replace("postgresql+psycopg://", "postgresql://", 1)
        for _ in range(PG_CONNECTIONS):
            self.idle.put_nowait(await psycopg.AsyncConnection.connect(conninfo,
                                                                       autocommit=True))

    async def read(self, appid: str, openid: str) -> str | None:
        if self.sqlite is not None:
            row = self.sqlite.execute(SQL.format(p="?"), (appid, openid)).fetchone()
        else:
            conn = await self.idle.get()
            try:
                cur = await conn.execute(SQL.format(p="%s"), (appid, openid), prepare=True)
                row = await cur.fetchone()
            finally:
                self.idle.put_nowait(conn)
        return None if row is None else str(row[0])

    async def close(self) -> None:
        if self.sqlite is not None:
            self.sqlite.close()
        while not self.idle.empty():
            await self.idle.get_nowait().close()


async def token(request: Request) -> Response:
    appid, openid = request.path_params["appid"], request.path_params["openid"]
    access_token = await request.app.state.reader.read(appid, openid)
    if access_token is None:
        return JSONResponse({"error": "not_found"}, status_code=404)
    return JSONResponse({"appid": appid, "openid": openid, "access_token": access_token})


async def healthz(request: Request) -> Response:
    return Response("ok")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    reader = Reader(os.environ["FLOOR_DATABASE_URL"])
    await reader.open()
    app.state.reader = reader
    try:
        yield
    finally:
        await reader.close()


app = Starlette(routes=[Route("/v1/apps/{appid}/users/{openid}/token", token),
                        Route("/healthz", healthz)], lifespan=lifespan)
