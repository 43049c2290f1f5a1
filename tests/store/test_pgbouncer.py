"""keeper's store through PgBouncer in transaction pooling mode (``database_pooler =
"pgbouncer"``): migrations (their advisory lock is transaction-scoped), claims with ``SKIP
LOCKED`` past psycopg's prepare threshold, the timeouts set per transaction, and the API's
token reader. Without the setting PgBouncer refuses keeper's connections (the startup
``options`` that carry the timeouts), which is why the setting exists."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import exc, make_url, text

from keeper.store import db
from keeper.store.grants import Store
from keeper.store.token_reader import TokenReader
from tests.conftest import TEST_CIPHER, require_postgres, reset_postgres
from tests.pgbouncer import PgBouncer
from tests.store.test_grants import NOW, grant, put

pytestmark = [pytest.mark.db, pytest.mark.e2e]


@pytest.fixture
def bounced() -> Iterator[tuple[str, PgBouncer]]:
    """(this run's empty database through a PgBouncer of its own, the PgBouncer)."""
    url = require_postgres()
    reset_postgres()
    bouncer = PgBouncer(pool_size=1).up()
    try:
        yield bouncer.url(url), bouncer
    finally:
        bouncer.down()


def test_without_the_setting_pgbouncer_refuses_the_connection(
    bounced: tuple[str, PgBouncer],
) -> None:
    url, _ = bounced
    engine = db.make_engine(url, pool_size=1)
    try:
        with pytest.raises(exc.OperationalError, match="unsupported startup parameter"):
            engine.connect().close()
    finally:
        engine.dispose()


def test_the_store_works_through_pgbouncer_in_transaction_mode(
    bounced: tuple[str, PgBouncer],
) -> None:
    """Given PgBouncer with one server connection, when keeper migrates, claims in pages
    with two interleaved claimers, each with connections of its own (more statements than
    psycopg's prepare threshold: a statement prepared by one would clash with the other's on
    the shared server connection), and
    reads tokens the API's way, then every grant is claimed once, each transaction runs
    under keeper's timeouts (a long statement is cancelled), and PgBouncer pooled it all."""
    url, bouncer = bounced
    migrator = db.make_engine(url, pool_size=1, timeout_s=0, pooler="pgbouncer")
    try:
        db.upgrade(migrator, cipher=TEST_CIPHER)
    finally:
        migrator.dispose()
    store = Store(url, cipher=TEST_CIPHER, pool_size=4, timeout_s=3,
                  pooler="pgbouncer").open()
    other = Store(url, cipher=TEST_CIPHER, pool_size=1, timeout_s=3, pooler="pgbouncer")
    try:
        put(store, *(grant(f"o{i:02d}", access_expires_at=NOW) for i in range(40)))
        seen: list[int] = []
        for turn in range(40):
            page = (store, other)[turn % 2].claim(appids=["wx1"], cutoff=NOW, limit=3,
                                                  lease_id=f"L{turn % 2}", lease_s=300)
            if not page and turn % 2:
                break
            seen += [g.id for g in page]
        assert len(seen) == len(set(seen)) == 40
        for _ in range(3):  # every transaction, whichever server connection it got
            with store.engine.begin() as conn:
                got = [conn.execute(text(f"SHOW {name}")).scalar_one() for name in
                       ("statement_timeout", "lock_timeout",
                        "idle_in_transaction_session_timeout")]
                assert got == ["3s", "1s", "10s"]
        with pytest.raises(exc.OperationalError, match="statement timeout"), \
                store.engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))

        reader = TokenReader(store.engine, store.cipher, size=2, pooler="pgbouncer")

        async def reads() -> list[str]:
            try:
                return [(await reader.read("wx1", f"o{i % 40:02d}")).access_token  # type: ignore[union-attr]
                        for i in range(20)]
            finally:
                await reader.close()

        assert asyncio.run(reads()) == [f"AT-o{i % 40:02d}" for i in range(20)]
    finally:
        store.close()
        other.close()
    stats = bouncer.stats(make_url(url).database or "")
    assert stats.get("total_xact_count", 0) >= 40, stats
