"""The quota rows: one GCRA state per (app, endpoint), changed only by compare-and-swap.

A mixin of :class:`keeper.store.grants.Store`, which provides ``engine`` and ``_insert``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, case, select, update

from keeper.core.quota import window_start_us
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

    def quota_swap(self, appid: str, endpoint: str, old_us: int, new_us: int, *,
                   permits: int = 0, now_us: int = 0, period_us: int = 0) -> bool:
        """Compare-and-swap the quota state; False if another taker got there first.

        ``permits`` taken at ``now_us`` are counted in the row's window of ``period_us``
        (the status page's "quota used"), in the same statement: no extra round trip.
        """
        values: dict[str, Any] = {"tat_us": new_us}
        if permits and period_us > 0:
            c = quota_state.c
            start = window_start_us(now_us, period_us)
            # Every SET expression reads the row as it was before the statement.
            values.update(
                previous_permits=case((c.window_us == start, c.previous_permits),
                                      (c.window_us == start - period_us, c.window_permits),
                                      else_=0),
                window_permits=case((c.window_us == start, c.window_permits + permits),
                                    else_=permits),
                window_us=start,
            )
        with translate("taking quota"), self.engine.begin() as conn:
            result = conn.execute(
                update(quota_state)
                .where(
                    quota_state.c.appid == appid, quota_state.c.endpoint == endpoint,
                    quota_state.c.tat_us == old_us,
                )
                .values(**values)
            )
        return bool(result.rowcount == 1)

    def quota_rows(self) -> list[dict[str, Any]]:
        """Every quota row: ``appid``, ``endpoint``, ``tat_us``, ``window_us``,
        ``window_permits``, ``previous_permits`` (a row per app and endpoint ever used)."""
        with translate("reading quota state"), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(quota_state).order_by(quota_state.c.appid, quota_state.c.endpoint))]

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
