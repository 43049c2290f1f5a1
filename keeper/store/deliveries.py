"""Deliveries: each webhook's share of the outbox, and the lease of the one process that
sends to it. A mixin of :class:`keeper.store.grants.Store`, which provides ``engine`` and
``_insert``.

A webhook's row holds its cursor (the last event number fanned out to it) and its lease. The
holder fans out in one transaction (a delivery row for each new event of a type the webhook
wants, and the cursor moved past them) and sends its due deliveries one at a time, oldest due
first. Event numbers follow commit order (:func:`keeper.store.counters.take_seqs`), so a
cursor never passes an event that commits later. A webhook seen for the first time starts at
the newest number: it gets what happens from then on, not the history.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from keeper.store.clock import clock_params, db_later, db_now
from keeper.store.db import translate
from keeper.store.schema import counters, deliveries, events, webhooks

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True)
class Due:
    """A delivery to attempt now: the event's exact body and how it has fared so far."""

    event_id: str
    type: str
    body: str
    attempts: int
    first_try_at: datetime


class Deliveries:
    """Webhook leases, fan-out and delivery outcomes."""

    engine: Engine
    sqlite: bool

    def _insert(self, table: Any) -> Any:
        raise NotImplementedError

    def webhook_holder(self, key: str) -> str | None:
        """Who holds the webhook's lease (maybe lapsed), if anyone."""
        with translate("reading a webhook"), self.engine.connect() as conn:
            return conn.execute(select(webhooks.c.holder).where(webhooks.c.key == key)).scalar()

    def take_webhook(self, key: str, holder: str, *, now: datetime, lease_s: float,
                     takeover: str | None = None) -> bool:
        """Take or renew the webhook's lease for ``lease_s`` of the database's clock (on
        SQLite: until ``now + lease_s``, see :mod:`keeper.store.clock`); whether it is held.

        One conditional UPDATE (like the grants' leases): it succeeds when nobody holds the
        webhook, ``holder`` does, the lease has lapsed, or the holder is ``takeover`` (a
        process on this host known to be dead). On PostgreSQL two processes racing for it
        serialize on the row: one wins.
        """
        top = select(counters.c.value).where(counters.c.name == "events").scalar_subquery()
        free = (webhooks.c.holder.is_(None) | (webhooks.c.holder == holder)
                | (webhooks.c.lease_until <= db_now(self.sqlite, "b_now")))
        if takeover is not None:
            free = free | (webhooks.c.holder == takeover)
        with translate("taking a webhook"), self.engine.begin() as conn:
            conn.execute(self._insert(webhooks).values(key=key, cursor=top)
                         .on_conflict_do_nothing(index_elements=["key"]))
            result = conn.execute(
                update(webhooks).where(webhooks.c.key == key, free).values(
                    holder=holder, lease_until=db_later(self.sqlite, "b_until")),
                clock_params(self.sqlite, now, lease_s, now_name="b_now", later_name="b_until"),
            )
        return bool(result.rowcount == 1)

    def release_webhook(self, key: str, holder: str) -> None:
        with translate("releasing a webhook"), self.engine.begin() as conn:
            conn.execute(update(webhooks).where(webhooks.c.key == key,
                                                webhooks.c.holder == holder)
                         .values(holder=None, lease_until=None))

    def events_top(self) -> int:
        """The newest event number (0: none); cheap, for polling."""
        with translate("reading events"), self.engine.connect() as conn:
            return int(conn.execute(select(func.max(events.c.seq))).scalar() or 0)

    def fan_out(self, key: str, holder: str, types: Collection[str], *, now: datetime,
                batch: int = 1000) -> int | None:
        """Give the webhook a delivery row for each event past its cursor whose type it
        wants, due now, and move the cursor past them (at most ``batch``): one transaction.
        The number of events passed, or None when ``holder`` no longer holds the webhook."""
        with translate("fanning out events"), self.engine.begin() as conn:
            cursor = conn.execute(
                select(webhooks.c.cursor)
                .where(webhooks.c.key == key, webhooks.c.holder == holder)
                .with_for_update()
            ).scalar()
            if cursor is None:
                return None
            rows = conn.execute(
                select(events.c.id, events.c.seq, events.c.type)
                .where(events.c.seq > cursor).order_by(events.c.seq).limit(batch)
            ).all()
            if not rows:
                return 0
            wanted = [{"webhook": key, "event_id": r.id, "seq": r.seq, "state": PENDING,
                       "attempts": 0, "next_attempt_at": now, "first_try_at": now}
                      for r in rows if r.type in types]
            if wanted:
                conn.execute(insert(deliveries), wanted)
            conn.execute(update(webhooks).where(webhooks.c.key == key)
                         .values(cursor=rows[-1].seq))
        return len(rows)

    def due(self, key: str, now: datetime, limit: int = 1) -> list[Due]:
        """The webhook's deliveries due by ``now``, the one due longest ago first (then the
        oldest event), at most ``limit``."""
        q = (select(deliveries.c.event_id, events.c.type, events.c.body, deliveries.c.attempts,
                    deliveries.c.first_try_at)
             .join(events, events.c.id == deliveries.c.event_id)
             .where(deliveries.c.webhook == key, deliveries.c.state == PENDING,
                    deliveries.c.next_attempt_at <= now)
             .order_by(deliveries.c.next_attempt_at, deliveries.c.seq).limit(limit))
        with translate("reading deliveries"), self.engine.connect() as conn:
            return [Due(r.event_id, r.type, r.body, r.attempts, r.first_try_at)
                    for r in conn.execute(q)]

    def settle(self, key: str, due: Due, *, now: datetime, state: str,
               next_attempt_at: datetime | None, status: int | None,
               error: str | None) -> bool:
        """Write one attempt's outcome: ``delivered``, ``pending`` again at
        ``next_attempt_at``, or ``failed``. Only over the attempt it started from (a replay
        meanwhile wins); whether it was written."""
        values: dict[str, Any] = {
            "attempts": due.attempts + 1, "state": state, "next_attempt_at": next_attempt_at,
            "last_status": status, "last_error": error[:120] if error else None,
        }
        if state == DELIVERED:
            values["delivered_at"] = now
        with translate("recording a delivery"), self.engine.begin() as conn:
            result = conn.execute(update(deliveries).where(
                deliveries.c.webhook == key, deliveries.c.event_id == due.event_id,
                deliveries.c.state == PENDING, deliveries.c.attempts == due.attempts,
            ).values(values))
        return bool(result.rowcount == 1)
