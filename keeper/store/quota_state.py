"""The quota rows: one GCRA state per (app, endpoint), changed only by compare-and-swap.

A mixin of :class:`keeper.store.grants.Store`, which provides ``engine`` and ``_insert``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select, update

from keeper.store.db import translate
from keeper.store.schema import quota_state


class QuotaState:
    """Shared quota state (see :mod:`keeper.core.quota` for the arithmetic)."""

    engine: Engine

    def _insert(self, table: Any) -> Any:
        raise NotImplementedError

    def quota_tat(self, appid: str, endpoint: str) -> int:
        """The quota row's state (created at 0 on first use)."""
        with translate("reading quota state"), self.engine.begin() as conn:
            tat = conn.execute(
                select(quota_state.c.tat_us).where(
                    quota_state.c.appid == appid, quota_state.c.endpoint == endpoint
                )
            ).scalar()
            if tat is None:
                conn.execute(
                    self._insert(quota_state)
                    .values(appid=appid, endpoint=endpoint, tat_us=0)
                    .on_conflict_do_nothing()
                )
                return 0
        return int(tat)

    def quota_swap(self, appid: str, endpoint: str, old_us: int, new_us: int) -> bool:
        """Compare-and-swap the quota state; False if another taker got there first."""
        with translate("taking quota"), self.engine.begin() as conn:
            result = conn.execute(
                update(quota_state)
                .where(
                    quota_state.c.appid == appid, quota_state.c.endpoint == endpoint,
                    quota_state.c.tat_us == old_us,
                )
                .values(tat_us=new_us)
            )
        return bool(result.rowcount == 1)

    def quota_hold(self, appid: str, endpoint: str, tat_us: int) -> None:
        """Push the quota state to at least ``tat_us`` (a 45011 pause)."""
        self.quota_tat(appid, endpoint)
        with translate("pausing quota"), self.engine.begin() as conn:
            conn.execute(
                update(quota_state)
                .where(
                    quota_state.c.appid == appid, quota_state.c.endpoint == endpoint,
                    quota_state.c.tat_us < tat_us,
                )
                .values(tat_us=tat_us)
            )
