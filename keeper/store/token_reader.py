"""The token look-up for an event loop: ``keeper serve``'s fast path for a token that is still
fresh, read without leaving the event loop.

Through the thread pool, a fresh token cost a thread hop, a pool checkout with its pre-ping
round trip and SQLAlchemy's execution machinery, about 1.2 ms of CPU a request; read here it
is one prepared statement (``python -m bench api`` has the figures). Anything but a clean answer
raises :class:`Unreadable`, and the caller takes the ordinary path, which has the outage
handling (waits, retries, the journal): this path is only ever a shortcut.

PostgreSQL: a few psycopg ``AsyncConnection`` of its own (autocommit: one SELECT needs no
transaction), each query bounded by ``timeout_s`` so a silent network never holds a request;
a connection that failed or timed out is closed, never reused. SQLite: the file opened
read-only and read inline (WAL readers never wait for the writer; a busy database is not
waited for but answered by the ordinary path).

Decrypting the token was a fifth of a fresh token's CPU, for the same answer each time the
row is read again: the reader keeps the last :data:`DECRYPTED` plaintexts by ciphertext (a
row is still read for every request, so a token changed or deleted is never answered from
here; ~10 MB at most with WeChat's 110-character tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from keeper.crypto import Cipher
from keeper.store.db import sqlite_path
from keeper.store.pg_session import PG_TCP
from keeper.store.users import TokenRow, token_row_of, token_row_sql

_SQL_SQLITE = token_row_sql(sqlite_dialect(paramstyle="named"))  # :appid, :openid
_SQL_PG = token_row_sql(psycopg_dialect())  # type: ignore[no-untyped-call]  # %(appid)s


#: Decrypted tokens kept by ciphertext, per reader (one a server process), least recently
#: used first out.
DECRYPTED = 16384


class Unreadable(Exception):
    """The fast path could not answer; take the ordinary one."""


class TokenReader:
    """Reads one grant's token row on the event loop (``await reader.read(appid, openid)``).

    ``size``: PostgreSQL connections kept; a request finding them all busy waits for one.
    ``timeout_s``: the longest a PostgreSQL query (or a connect) may take.
    ``pooler``: ``"pgbouncer"`` (transaction pooling): the read is not prepared (PgBouncer
    before 1.21 cannot route prepared statements) and carries no startup ``options`` (which
    PgBouncer refuses); ``timeout_s`` still bounds it here, by the client, which closes the
    connection (PgBouncer then drops its server connection too).
    """

    def __init__(self, engine: Engine, cipher: Cipher, *, size: int = 4,
                 timeout_s: float = 2.0, pooler: str = "none") -> None:
        self.cipher = cipher
        self._decrypt = functools.lru_cache(maxsize=DECRYPTED)(cipher.decrypt)
        self.prepare = pooler != "pgbouncer"
        self.timeout_s = timeout_s
        self.size = size
        self._sqlite: sqlite3.Connection | None = None
        self._pg_args: dict[str, Any] | None = None
        if engine.dialect.name == "sqlite":
            path = sqlite_path(str(engine.url))
            if path is None:
                raise ValueError("an in-memory SQLite database has no file to read")
            self._sqlite_path = path
        else:
            _, kwargs = engine.dialect.create_connect_args(engine.url)
            self._pg_args = {**kwargs, **PG_TCP, "connect_timeout": max(1, int(timeout_s))}
            if self.prepare:
                self._pg_args["options"] = f"-c statement_timeout={int(timeout_s * 1000)}"
            else:
                self._pg_args["prepare_threshold"] = None
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(size)

    async def read(self, appid: str, openid: str) -> TokenRow | None:
        """The row, ``None`` if there is no grant; :class:`Unreadable` on any trouble."""
        if self._pg_args is None:
            row = self._read_sqlite(appid, openid)
        else:
            row = await self._read_pg(appid, openid)
        if row is None:
            return None
        try:
            return token_row_of(row, self._decrypt, _utc)
        except Exception:  # a key this process lacks: the ordinary path says so properly
            raise Unreadable("token not readable here") from None

    def _read_sqlite(self, appid: str, openid: str) -> tuple[Any, ...] | None:
        try:
            if self._sqlite is None:
                # timeout 0: a locked database is answered by the ordinary path, not waited for.
                self._sqlite = sqlite3.connect(f"file:{self._sqlite_path}?mode=ro", uri=True,
                                               timeout=0, check_same_thread=False)
            row: tuple[Any, ...] | None = self._sqlite.execute(
                _SQL_SQLITE, {"appid": appid, "openid": openid}).fetchone()
            return row
        except sqlite3.Error:
            self._close_sqlite()
            raise Unreadable("SQLite read failed") from None

    async def _read_pg(self, appid: str, openid: str) -> tuple[Any, ...] | None:
        if self._slots.locked():  # all busy: wait for one, but not for ever
            try:
                await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
            except TimeoutError:
                raise Unreadable("no connection free") from None
        else:  # taken at once: no task made for a timeout (wait_for makes one)
            await self._slots.acquire()
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = self._idle.pop() if self._idle else await self._connect()
                cur = await conn.execute(_SQL_PG, {"appid": appid, "openid": openid},
                                         prepare=self.prepare)
                row: tuple[Any, ...] | None = await cur.fetchone()
            self._idle.append(conn)
            return row
        except (Exception, asyncio.CancelledError) as e:
            # Failed, timed out or cancelled mid-query: the connection's state is unknown.
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1.0)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise Unreadable("PostgreSQL read failed") from None
        finally:
            self._slots.release()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        assert self._pg_args is not None
        return await psycopg.AsyncConnection.connect(autocommit=True, **self._pg_args)

    def _close_sqlite(self) -> None:
        if self._sqlite is not None:
            with contextlib.suppress(sqlite3.Error):
                self._sqlite.close()
            self._sqlite = None

    async def close(self) -> None:
        self._close_sqlite()
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)


def _utc(value: Any) -> datetime:
    """A stored time as an aware UTC datetime (SQLite keeps naive ISO text)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
