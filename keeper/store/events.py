"""The outbox: events recorded inside the transaction of the change they report, and what
``keeper events`` and ``keeper status`` read of them.

:func:`record_events` is called by every writer of a change (the sweep's batch write, imports
and logins, a delete, an avatar) on its own connection, inside its own transaction: a change
that is rolled back leaves no event, and one that commits leaves exactly its events. The
``Outbox`` mixin of :class:`keeper.store.grants.Store` lists, replays and prunes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, exists, func, insert, select, update

from keeper.core.events import NewEvent, body, new_event_id
from keeper.store.counters import take_seqs
from keeper.store.db import translate
from keeper.store.deliveries import FAILED, PENDING
from keeper.store.schema import deliveries, events


def record_events(conn: Any, news: Sequence[NewEvent], now: datetime) -> list[str]:
    """Record ``news`` in the caller's transaction; their ids.

    Numbers come from the ``events`` counter, whose row stays locked until the caller commits:
    a deliverer that has seen number k has seen every event below it. Callers take it after
    any other counter (``reauth``), always in that order, so two writers never deadlock.
    """
    if not news:
        return []
    rows: list[dict[str, Any]] = []
    for event, seq in zip(news, take_seqs(conn, "events", len(news)), strict=True):
        event_id = new_event_id()
        rows.append({"id": event_id, "seq": seq, "type": event.type, "appid": event.appid,
                     "openid": event.openid, "created_at": now,
                     "body": body(event_id, event, now)})
    conn.execute(insert(events), rows)
    return [r["id"] for r in rows]


class Outbox:
    """What operators ask of the outbox: lists, counts, replays, pruning."""

    engine: Engine

    def iter_events(self, *, failed_only: bool = False, batch: int = 500
                    ) -> Iterator[dict[str, Any]]:
        """Events in the order they were recorded, each with its deliveries (a list of
        ``{webhook, state, attempts, next_attempt_at, last_status, last_error,
        delivered_at}``). ``failed_only``: those with a failed delivery."""
        after = 0
        while True:
            q = select(events.c.id, events.c.seq, events.c.type, events.c.appid,
                       events.c.openid, events.c.created_at).where(events.c.seq > after)
            if failed_only:
                q = q.where(exists().where(deliveries.c.event_id == events.c.id,
                                           deliveries.c.state == FAILED))
            with translate("listing events"), self.engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(q.order_by(events.c.seq)
                                                               .limit(batch))]
                ids = [r["id"] for r in rows]
                sent: dict[str, list[dict[str, Any]]] = {}
                if ids:
                    for d in conn.execute(select(deliveries).where(
                            deliveries.c.event_id.in_(ids)).order_by(deliveries.c.webhook)):
                        m = dict(d._mapping)
                        sent.setdefault(m.pop("event_id"), []).append(m)
            for r in rows:
                r["deliveries"] = [{k: v for k, v in d.items() if k not in ("seq",
                                                                          "first_try_at")}
                                   for d in sent.get(r["id"], [])]
                yield r
            if len(rows) < batch:
                return
            after = rows[-1]["seq"]

    def event_body(self, event_id: str) -> str | None:
        with translate("reading an event"), self.engine.connect() as conn:
            return conn.execute(select(events.c.body).where(events.c.id == event_id)).scalar()

    def replay(self, now: datetime, *, event_id: str | None = None) -> int:
        """Make deliveries pending again, due now, with a fresh 72-hour window: those of
        ``event_id`` (whatever their state), else every failed one. The number changed."""
        cond = (deliveries.c.event_id == event_id) if event_id else (deliveries.c.state == FAILED)
        with translate("replaying events"), self.engine.begin() as conn:
            result = conn.execute(update(deliveries).where(cond).values(
                state=PENDING, attempts=0, next_attempt_at=now, first_try_at=now,
                delivered_at=None))
        return int(result.rowcount or 0)

    def event_exists(self, event_id: str) -> bool:
        with translate("reading an event"), self.engine.connect() as conn:
            return conn.execute(select(events.c.id).where(events.c.id == event_id)).first() \
                is not None

    def prune_events(self, now: datetime, retention_s: float) -> int:
        """Forget events older than ``retention_s`` that no webhook still has to send
        (delivered, failed, or never wanted), and their deliveries. The number pruned."""
        cutoff = now - timedelta(seconds=retention_s)
        old = select(events.c.id).where(
            events.c.created_at < cutoff,
            ~exists().where(deliveries.c.event_id == events.c.id,
                            deliveries.c.state == PENDING),
        )
        with translate("pruning events"), self.engine.begin() as conn:
            ids = conn.execute(old.limit(5000)).scalars().all()
            if not ids:
                return 0
            conn.execute(delete(deliveries).where(deliveries.c.event_id.in_(ids)))
            conn.execute(delete(events).where(events.c.id.in_(ids)))
        return len(ids)

    def delivery_counts(self) -> dict[str, int]:
        """``events_pending`` and ``events_failed``: deliveries waiting, and given up."""
        with translate("counting deliveries"), self.engine.connect() as conn:
            row = conn.execute(select(
                func.count().filter(deliveries.c.state == PENDING),
                func.count().filter(deliveries.c.state == FAILED),
            )).one()
        return {"events_pending": int(row[0]), "events_failed": int(row[1])}

