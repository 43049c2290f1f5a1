"""The event loop's token look-up (``keeper serve``'s fast path): it reads what the store
wrote, on both databases, and on any trouble says :class:`Unreadable` quickly instead of
waiting, so the API falls back to its ordinary path. Also the pool's ping of idle
connections, which replaced SQLAlchemy's ping at every checkout."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from keeper.core.models import REAUTH
from keeper.crypto import Cipher
from keeper.store import db, token_reader
from keeper.store.grants import Store
from keeper.store.token_reader import TokenReader, Unreadable
from tests.conftest import require_postgres
from tests.store.test_grants import NOW, grant, put
from tests.store.test_users import record


def read(reader: TokenReader, openid: str) -> object:
    async def go() -> object:
        try:
            return await reader.read("wx1", openid)
        finally:
            await reader.close()

    return asyncio.run(go())


def test_it_reads_the_row_the_store_wrote(store: Store) -> None:
    put(store, grant("o1", access_expires_at=NOW + timedelta(minutes=90)))
    row = read(TokenReader(store.engine, store.cipher), "o1")
    assert row == store.token_row("wx1", "o1")
    assert row is not None and row.access_token == "AT-o1"  # type: ignore[attr-defined]
    assert row.access_expires_at == NOW + timedelta(minutes=90)  # type: ignore[attr-defined]


def test_a_token_read_again_is_decrypted_once_and_a_new_one_is_read_anew(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader keeps decrypted tokens by ciphertext: the row is still read every time, so
    a token stored since is what is answered; and no more are kept than DECRYPTED."""
    monkeypatch.setattr(token_reader, "DECRYPTED", 2)
    decrypted: list[str] = []

    class Counting(Cipher):
        def decrypt(self, token: str) -> str:
            decrypted.append(token)
            return store.cipher.decrypt(token)

    put(store, grant("o1"), grant("o2"), grant("o3"))
    reader = TokenReader(store.engine, Counting([Fernet.generate_key()]))

    async def go(*openids: str) -> list[str]:
        rows = [await reader.read("wx1", o) for o in openids]
        return [r.access_token for r in rows if r is not None]

    assert asyncio.run(go("o1", "o1", "o1")) == ["AT-o1"] * 3
    assert len(decrypted) == 1
    put(store, grant("o1", access_token="AT-o1-new"))
    assert asyncio.run(go("o1", "o1")) == ["AT-o1-new"] * 2
    assert len(decrypted) == 2
    asyncio.run(go("o2", "o3", "o1"))  # o1's newest plaintext was the least recently used
    assert len(decrypted) == 5
    asyncio.run(reader.close())


def test_a_missing_grant_is_none_and_a_dead_one_says_so(store: Store) -> None:
    put(store, grant("o1"))
    record(store, "o1")
    reader = TokenReader(store.engine, store.cipher)
    assert read(reader, "nobody") is None
    row = read(reader, "o1")
    assert row is not None and row.state == REAUTH  # type: ignore[attr-defined]


def test_a_token_under_a_key_it_lacks_is_unreadable(store: Store) -> None:
    put(store, grant("o1"))
    other = Store(store.url, cipher=Cipher([Fernet.generate_key()]))
    with pytest.raises(Unreadable):
        read(TokenReader(other.engine, other.cipher), "o1")
    other.close()


#: PostgreSQL only: SQLite readers in WAL mode never wait for a lock, and have no connection
#: another session could kill.
POSTGRES_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@POSTGRES_ONLY
def test_a_locked_table_is_unreadable_within_the_timeout_and_the_next_read_works(
        store: Store) -> None:
    put(store, grant("o1"))
    reader = TokenReader(store.engine, store.cipher, timeout_s=0.5)
    holder = create_engine(require_postgres_url(store))

    async def go() -> tuple[float, object]:
        assert await reader.read("wx1", "o1") is not None  # a connection exists
        with holder.connect() as conn:
            conn.execute(text("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            with pytest.raises(Unreadable):
                await reader.read("wx1", "o1")
            took = time.monotonic() - started
            conn.rollback()
        again = await reader.read("wx1", "o1")
        await reader.close()
        return took, again

    took, again = asyncio.run(go())
    holder.dispose()
    assert took < 2.0
    assert again is not None


@POSTGRES_ONLY
def test_a_killed_connection_fails_one_read_and_is_replaced(store: Store) -> None:
    put(store, grant("o1"))
    reader = TokenReader(store.engine, store.cipher, size=1)
    admin = create_engine(require_postgres_url(store), isolation_level="AUTOCOMMIT")

    async def go() -> list[str]:
        outcomes = []
        await reader.read("wx1", "o1")
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                              "AND application_name = ''"))
        for _ in range(2):
            try:
                await reader.read("wx1", "o1")
                outcomes.append("read")
            except Unreadable:
                outcomes.append("unreadable")
        await reader.close()
        return outcomes

    outcomes = asyncio.run(go())
    admin.dispose()
    assert outcomes[-1] == "read"


def require_postgres_url(store: Store) -> str:
    require_postgres()
    return store.engine.url.render_as_string(hide_password=False)


@pytest.mark.db
def test_a_pooled_connection_idle_for_a_while_is_pinged_and_replaced_when_dead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = require_postgres()
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)
    engine = db.make_engine(url, pool_size=1, max_overflow=0)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": first})
    with engine.connect() as conn:  # no error: the ping found it dead, the pool replaced it
        second = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    assert second != first
    engine.dispose()
    admin.dispose()


@pytest.mark.db
def test_a_connection_just_checked_in_is_not_pinged(monkeypatch: pytest.MonkeyPatch) -> None:
    url = require_postgres()
    engine = db.make_engine(url, pool_size=1, max_overflow=0)
    pings: list[object] = []
    monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append(c) or True)
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert pings == []
    engine.dispose()
