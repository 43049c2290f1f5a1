"""Migrations (keeper/store/db.py): processes upgrading one PostgreSQL database at once take
turns on an advisory lock."""

from __future__ import annotations

import pytest

from keeper.store import db
from keeper.wechat.simulator import Simulator
from tests.conftest import Keeper, config_text, require_postgres, reset_postgres


@pytest.mark.db
def test_two_upgrades_at_once_on_an_empty_postgresql_database_both_succeed(
    keeper: Keeper, sim: Simulator
) -> None:
    # Given an empty PostgreSQL database
    url = require_postgres()
    reset_postgres()
    keeper.write_config(config_text(db_url=url, api_base=sim.url))
    # When two `keeper db upgrade` start together
    first, second = keeper.start("db", "upgrade"), keeper.start("db", "upgrade")
    outs = [p.communicate(timeout=60) for p in (first, second)]
    # Then both exit 0 (the second waits for the first, then finds nothing to do)...
    assert (first.returncode, second.returncode) == (0, 0), [err for _, err in outs]
    # ...and the schema is at head
    engine = db.make_engine(url)
    try:
        assert db.current_revision(engine) == db.head_revision(engine) is not None
    finally:
        engine.dispose()
