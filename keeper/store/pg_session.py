"""How keeper's PostgreSQL sessions are set up: TCP settings, timeouts (at connect, or per
transaction behind PgBouncer), and batches that keep the idle-in-transaction timer armed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event

#: TCP settings of every PostgreSQL connection: a silent network (packets dropped, no reset)
#: is noticed within ~15 s instead of the kernel's two hours. Keepalive probes find a dead peer
#: while keeper waits for an answer (5 s idle, then 3 probes 2 s apart); tcp_user_timeout ends
#: a connection whose sent data stays unacknowledged for 10 s.
PG_TCP = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
#: Longest wait for a lock (ms), at most: a session holding a table lock makes keeper say so
#: (as the database being unavailable) instead of sitting silently behind it.
LOCK_TIMEOUT_CAP_MS = 10_000
#: Longest a transaction may sit idle between statements (ms) before PostgreSQL ends the
#: session. keeper never waits on anything but the database inside a transaction, so this only
#: fires for a client that went silent mid-transaction: a host whose link went down between
#: an UPDATE and its COMMIT. Without it, the rows it updated stay locked (and skipped by every
#: other host's ``SKIP LOCKED`` claim) until PostgreSQL's side of the connection dies, which a
#: silent network (or a pooler or forwarder that still holds it) can put off for hours. Well
#: under the shortest lease (31 s), so a cut host's grants are free when its leases lapse.
IDLE_IN_TRANSACTION_MS = 10_000


def pg_timeouts(timeout_s: float) -> dict[str, int]:
    """PostgreSQL's settings for a statement timeout of ``timeout_s`` (ms; 0: none)."""
    statement_ms = int(timeout_s * 1000)
    return {
        "statement_timeout": statement_ms,
        "lock_timeout": min(LOCK_TIMEOUT_CAP_MS, statement_ms // 3) if statement_ms else 0,
        "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_MS if statement_ms else 0,
    }


def timeouts_per_transaction(engine: Engine, timeouts: dict[str, int]) -> None:
    """Behind PgBouncer: the timeouts as the first statement of every transaction
    (``set_config(..., is_local => true)``, i.e. ``SET LOCAL``). A session setting would stay
    on whichever server connection PgBouncer lent, for another client's transactions; a local
    one ends with the transaction. One round trip more per transaction."""
    sql = "SELECT " + ", ".join(f"set_config('{k}', '{v}', true)" for k, v in timeouts.items())

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        with conn.connection.driver_connection.cursor() as cur:
            cur.execute(sql)


def idle_timer_after_executemany(engine: Engine) -> None:
    """Keep ``idle_in_transaction_session_timeout`` armed after an ``executemany``.

    psycopg runs ``executemany`` as a pipeline that ends with a Sync and a Flush. PostgreSQL
    arms its idle-in-transaction timer when it answers the Sync and disarms it on the next
    message, the Flush, without arming it again: a client that vanished after sending such a
    batch (a host cut off between writing its results and committing them) left the
    transaction open, and the rows it updated locked, until the connection died, which a
    silent network or a forwarder still holding it can put off for hours. So a batch goes as
    one script instead: the rows' statements with their values bound by psycopg on this side
    (:class:`psycopg.ClientCursor`, the same adaptation), sent as one simple query, answered
    once, after which the timer is armed like after any statement. Still one round trip per
    batch.
    """
    import psycopg

    @event.listens_for(engine, "do_executemany")
    def _executemany(cursor: Any, statement: str, parameters: Any, _context: Any) -> bool:
        binder = psycopg.ClientCursor(cursor.connection)
        script = ";\n".join(binder.mogrify(statement, p) for p in parameters)
        cursor.execute(script)  # no parameters: the simple query protocol
        return True
