"""The quota rows: one GCRA state per (app, endpoint), changed only by compare-and-swap.

A mixin of :class:`keeper.store.grants.Store`, which provides ``engine`` and ``_insert``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, bindparam, case, select, update

from keeper.clock import utcnow
from keeper.core.quota import Decision, window_start_us
from keeper.store.clock import db_now_us
from keeper.store.db import translate
from keeper.store.schema import quota_state


class QuotaState:
    """Shared quota state (see :mod:`keeper.core.quota` for the arithmetic)."""

    engine: Engine
    sqlite: bool

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
                self._create_row(conn, appid, endpoint)
                return 0
        return int(tat)

    def _create_row(self, conn: Any, appid: str, endpoint: str) -> None:
        """The quota row at 0 (its first use); another process may create it first."""
        conn.execute(self._insert(quota_state).values(appid=appid, endpoint=endpoint, tat_us=0)
                     .on_conflict_do_nothing())

    def quota_take(
        self, appid: str, endpoint: str, decide: Callable[[int, int], Decision], *,
        period_us: int = 0,
    ) -> tuple[Decision, int] | None:
        """One try at taking permits: read the state and the database's clock (microseconds),
        ask ``decide(tat_us, now_us)`` and, when it grants permits, write the new state.
        Returns the decision and the ``now_us`` it was made at, or ``None`` to try again (the
        row was just created, or on SQLite another taker changed the state first).

        PostgreSQL: one transaction holding the row locked from the read to the commit, its
        clock (``clock_timestamp()``) read once the lock is held, so every host's permits are
        placed on one time line and takers wait their turn instead of racing. SQLite (one
        host): this process's clock, and a compare-and-swap. Granted permits are counted in
        the row's window of ``period_us`` by the statement that writes the state (the status
        page's "quota used").
        """
        if self.sqlite:
            # One host, and its clock is the database's. Read and swap stay two transactions:
            # a read transaction that then writes fails at once on SQLite when another
            # process wrote meanwhile, where the compare-and-swap simply says "look again".
            tat_us, now_us = self.quota_tat(appid, endpoint), int(time.time() * 1_000_000)
            decision = decide(tat_us, now_us)
            if decision.granted and not self.quota_swap(
                    appid, endpoint, tat_us, decision.new_tat_us, permits=decision.granted,
                    now_us=now_us, period_us=period_us):
                return None
            return decision, now_us
        keys = {"b_appid": appid, "b_endpoint": endpoint}
        with translate("taking quota"), self.engine.begin() as conn:
            # The row is locked until this transaction ends: takers on other hosts wait their
            # turn (a round trip) instead of losing a compare-and-swap and asking again.
            row = conn.execute(_TAKE_READ, keys).first()
            if row is None:
                self._create_row(conn, appid, endpoint)
                return None
            tat_us, now_us = int(row[0]), int(row[1])
            decision = decide(tat_us, now_us)
            if decision.granted:
                swapped = conn.execute(_SWAP, _swap_params(
                    appid, endpoint, tat_us, decision.new_tat_us, decision.granted, now_us,
                    period_us))
                if swapped.rowcount != 1:
                    return None
        return decision, now_us

    def db_clock(self) -> datetime:
        """The database's time now (PostgreSQL's ``clock_timestamp()``; on SQLite this
        process's clock): for decisions other hosts must agree with, such as a quota pause."""
        if self.sqlite:
            return utcnow()
        with translate("reading the database's clock"), self.engine.connect() as conn:
            us = int(conn.execute(select(db_now_us())).scalar_one())
        return datetime.fromtimestamp(us / 1_000_000, UTC)

    def quota_swap(self, appid: str, endpoint: str, old_us: int, new_us: int, *,
                   permits: int = 0, now_us: int = 0, period_us: int = 0) -> bool:
        """Compare-and-swap the quota state; False if another taker got there first.
        ``permits`` taken at ``now_us`` are counted in the window of ``period_us``."""
        with translate("taking quota"), self.engine.begin() as conn:
            result = conn.execute(_SWAP, _swap_params(appid, endpoint, old_us, new_us, permits,
                                                      now_us, period_us))
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

    def quota_rows(self) -> list[dict[str, Any]]:
        """Every quota row: ``appid``, ``endpoint``, ``tat_us``, ``window_us``,
        ``window_permits``, ``previous_permits`` (a row per app and endpoint ever used)."""
        with translate("reading quota state"), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(quota_state).order_by(quota_state.c.appid, quota_state.c.endpoint))]


_KEY = (quota_state.c.appid == bindparam("b_appid"),
        quota_state.c.endpoint == bindparam("b_endpoint"))
_LOCKED = select(quota_state.c.tat_us).where(*_KEY).with_for_update().cte("locked")
#: PostgreSQL: the state, locked until commit, and the database's clock read once it is
#: locked (the outer SELECT runs after the CTE has waited for the lock).
_TAKE_READ = select(_LOCKED.c.tat_us, db_now_us().label("now_us"))
#: Compare-and-swap of the state (``b_old`` to ``b_tat``), counting ``b_permits`` taken in
#: their window (starting at ``b_start``, the one before at ``b_before``) and keeping the
#: previous window's count; every SET expression reads the row as it was before the statement.
#: Built once: the takes are many.
_SWAP = (
    update(quota_state).where(*_KEY, quota_state.c.tat_us == bindparam("b_old"))
    .values(
        tat_us=bindparam("b_tat"),
        previous_permits=case(
            (bindparam("b_permits") == 0, quota_state.c.previous_permits),
            (quota_state.c.window_us == bindparam("b_start"), quota_state.c.previous_permits),
            (quota_state.c.window_us == bindparam("b_before"), quota_state.c.window_permits),
            else_=0),
        window_permits=case(
            (bindparam("b_permits") == 0, quota_state.c.window_permits),
            (quota_state.c.window_us == bindparam("b_start"),
             quota_state.c.window_permits + bindparam("b_permits")),
            else_=bindparam("b_permits")),
        window_us=case((bindparam("b_permits") == 0, quota_state.c.window_us),
                       else_=bindparam("b_start")),
    )
)


def _swap_params(appid: str, endpoint: str, old_us: int, new_us: int, permits: int,
                 now_us: int, period_us: int) -> dict[str, Any]:
    """:data:`_SWAP`'s parameters: ``permits`` taken at ``now_us`` are counted in the window of
    ``period_us`` holding ``now_us`` (none counted without a period)."""
    start = window_start_us(now_us, period_us)
    return {"b_appid": appid, "b_endpoint": endpoint, "b_old": old_us, "b_tat": new_us,
            "b_permits": permits if period_us > 0 else 0, "b_start": start,
            "b_before": start - period_us}
