"""The database collector: a scrape is answered from the last read, which a thread renews while
scrapes come; the first scrape (or one finding the read too old) waits for a read; a database
that fails is ``keeper_database_up 0``, not a failed scrape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from keeper.config import Config, build_config
from keeper.observe import collector as module
from keeper.observe.collector import DatabaseCollector
from keeper.observe.exposition import registry_for
from keeper.store.grants import Store
from tests.conftest import TEST_CIPHER, wait_for
from tests.store.test_grants import grant, put


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return build_config({"apps": [{"appid": "wx1"}]}, env={}, source=str(tmp_path / "k.toml"))


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'k.db'}", cipher=TEST_CIPHER, auto_upgrade=True).open()
    yield s
    s.close()


def grants_seen(c: DatabaseCollector) -> int:
    return sum(c.snapshot().grants.values())


def test_scrapes_are_answered_from_a_read_renewed_in_the_background(
    sqlite_store: Store, config: Config
) -> None:
    put(sqlite_store, grant("a"))
    c = DatabaseCollector(store=lambda: sqlite_store, config=lambda: config, ttl_s=0.05)
    try:
        assert grants_seen(c) == 1  # the first scrape waits for a read
        first = c.last
        put(sqlite_store, grant("b"))
        wait_for(lambda: c.last is not first and grants_seen(c) == 2, timeout=10)
        assert c._refresher is not None  # renewed by the thread, not by the scrape
    finally:
        c.close()
    assert c._refresher is None


def test_a_read_older_than_the_limit_is_renewed_by_the_scrape(
    sqlite_store: Store, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = DatabaseCollector(store=lambda: sqlite_store, config=lambda: config, ttl_s=3600)
    try:
        assert grants_seen(c) == 0
        put(sqlite_store, grant("a"))
        assert grants_seen(c) == 0  # within the limit: the last read
        monkeypatch.setattr(module, "MAX_AGE_S", 0.0)
        assert grants_seen(c) == 1
    finally:
        c.close()


def test_a_failing_database_is_a_gauge_not_a_failed_scrape(
    sqlite_store: Store, config: Config, tmp_path: Path
) -> None:
    broken = Store(f"sqlite:///{tmp_path / 'missing' / 'k.db'}", cipher=TEST_CIPHER)
    c = DatabaseCollector(store=lambda: broken, config=lambda: config, ttl_s=0)
    text = generate_latest(registry_for(c)).decode()
    assert "keeper_database_up 0.0" in text and "keeper_grants{" not in text
    ok = DatabaseCollector(store=lambda: sqlite_store, config=lambda: config, ttl_s=0)
    text = generate_latest(registry_for(ok)).decode()
    assert "keeper_database_up 1.0" in text
    assert 'keeper_grants{app="wx1",state="active"} 0.0' in text  # zeros for configured apps
