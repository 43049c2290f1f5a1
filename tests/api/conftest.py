"""Fixtures of the API tests: ``served``, a running ``keeper serve`` on each database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keeper.wechat.simulator import Simulator
from tests.api.server import Served, serving
from tests.conftest import Keeper


@pytest.fixture
def served(keeper: Keeper, sim: Simulator, db_url: str) -> Iterator[Served]:
    """``keeper serve`` on SQLite and on PostgreSQL, against the simulator."""
    with serving(keeper, db_url=db_url, api_base=sim.url) as s:
        yield s
