"""Engines and migrations: SQLite (the embedded default) and PostgreSQL.

Every database failure leaves this layer as a :class:`StoreError` whose text holds neither
SQL parameters (tokens) nor the database password.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import make_url

from keeper.config import redact_url
from keeper.errors import ConfigError, DatabaseUnavailable, SchemaOutdated, StoreError
from keeper.log import scrub
from keeper.store.pg_session import (
    PG_TCP,
    idle_timer_after_executemany,
    pg_timeouts,
    timeouts_per_transaction,
)

MIGRATIONS = Path(__file__).parent / "migrations"
#: The PostgreSQL advisory lock that migrations take turns on (any fixed 64-bit number: this is
#: "keeper" in ASCII); held until the migration's transaction ends.
MIGRATION_LOCK = 0x6B6565706572


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (``None`` for an in-memory database)."""
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


#: Waiting this long for a connection from the pool is a database that does not answer.
POOL_TIMEOUT_S = 15


def _sqlite_pragmas(busy_ms: int) -> Any:
    def apply(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL lets readers run beside the one writer; NORMAL is durable at every checkpoint
        # and never corrupts; the busy timeout makes concurrent writers (a one-off sweep beside
        # the service) wait for each other, for at most database_timeout, instead of failing
        # at once or waiting forever.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return apply


def make_engine(url: str, *, pool_size: int = 8, max_overflow: int | None = None,
                timeout_s: float = 30.0, pooler: str = "none") -> Engine:
    """An engine with the settings keeper relies on. SQLite's file is created mode 0600.

    ``max_overflow``: connections opened past ``pool_size`` when all are busy, and closed
    again when returned (default: ``pool_size`` more).

    ``timeout_s``: the longest a statement may run on PostgreSQL (``statement_timeout``; lock
    waits get a third of it, at most 10 s) and the longest a wait for SQLite's write lock may
    last. ``0``: no statement timeout (migrations).

    ``pooler``: ``"pgbouncer"`` when the URL leads to PgBouncer in transaction pooling mode
    (one server connection per transaction, not per client): psycopg then prepares no
    statements (PgBouncer before 1.21 cannot route them), and the timeouts, which PgBouncer
    would refuse as a startup ``options`` parameter, are set per transaction instead
    (:func:`keeper.store.pg_session.timeouts_per_transaction`).
    """
    try:
        return _make_engine(url, pool_size=pool_size, timeout_s=timeout_s, pooler=pooler,
                            max_overflow=pool_size if max_overflow is None else max_overflow)
    except (exc.ArgumentError, ImportError) as e:
        raise ConfigError(
            f"database_url {redact_url(url)!r} is not usable: {type(e).__name__}"
        ) from None


def _make_engine(url: str, *, pool_size: int, max_overflow: int, timeout_s: float,
                 pooler: str) -> Engine:
    parsed = make_url(url)
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        busy_s = timeout_s or 30.0
        engine = create_engine(
            parsed,
            connect_args={"timeout": busy_s, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=max(POOL_TIMEOUT_S, busy_s),
            hide_parameters=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas(int(busy_s * 1000)))
        return engine
    connect_args: dict[str, Any] = {}
    postgres = parsed.get_backend_name() == "postgresql"
    timeouts = pg_timeouts(timeout_s)
    if postgres and pooler == "pgbouncer":
        connect_args = {**PG_TCP, "prepare_threshold": None}
    elif postgres:
        connect_args = {
            **PG_TCP, "options": " ".join(f"-c {k}={v}" for k, v in timeouts.items()),
        }
    engine = create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=1800,
        pool_timeout=POOL_TIMEOUT_S,
        hide_parameters=True,
        connect_args=connect_args,
    )
    _ping_when_idle(engine)
    if postgres:
        idle_timer_after_executemany(engine)
    if postgres and pooler == "pgbouncer" and timeouts["statement_timeout"]:
        timeouts_per_transaction(engine, timeouts)
    return engine


#: A pooled connection idle longer than this is pinged before it is handed out.
PING_AFTER_IDLE_S = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Survive a database restart without failing the next sweep: a connection that sat in
    the pool is pinged at checkout and, if dead, replaced (the pool retries with a new one).

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout: a round trip before each
    statement, a fifth of the CPU of an on-demand token refresh in ``keeper serve``
    (``python -m bench api``). A connection checked in moments ago was alive moments ago;
    one that breaks in between fails that statement as a database error, which keeper
    retries like any other outage.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)  # SQLAlchemy's own pre-ping, outside a transaction
        except Exception:
            raise exc.DisconnectionError("the pooled connection was dead") from None


def describe(error: BaseException) -> str:
    """One line about a database error: the driver's first line, scrubbed."""
    orig = getattr(error, "orig", None) or error
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return scrub(f"{type(orig).__name__}: {first}")[:300]


@contextlib.contextmanager
def translate(what: str) -> Iterator[None]:
    """Turn SQLAlchemy errors raised inside into :class:`StoreError` (no chaining).

    A value the driver cannot encode (a lone surrogate, say) raises UnicodeError before
    SQLAlchemy sees it: that too is the database refusing one row's data, said without the
    value.
    """
    failure: StoreError | None = None
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as e:
        failure = DatabaseUnavailable(f"{what}: database unavailable: {describe(e)}")
    except exc.SQLAlchemyError as e:
        failure = StoreError(f"{what}: {describe(e)}")
    except UnicodeError as e:
        failure = StoreError(f"{what}: a value the database cannot encode ({type(e).__name__})")
    if failure is not None:
        raise failure from None


def _alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with translate("reading the schema version"), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(
    engine: Engine, *, cipher: Any = None, target: str = "head"
) -> tuple[str | None, str | None]:
    """Apply every pending migration; (revision before, revision after).

    ``cipher`` (a :class:`keeper.crypto.Cipher`) lets the migration that introduced encryption
    encrypt tokens stored in plaintext before it. On PostgreSQL, processes upgrading at once
    take turns on an advisory lock (:data:`MIGRATION_LOCK`), and "before" is read under it.
    """
    before = current_revision(engine)
    cfg = _alembic_config(engine)
    with translate("migrating the schema"), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two processes upgrading at once take turns: the second waits here until the
            # first commits, then finds the schema at head and has nothing left to do.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        cfg.attributes["cipher"] = cipher
        command.upgrade(cfg, target)
    return before, current_revision(engine)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure_schema(engine: Engine, *, auto_upgrade: bool, cipher: Any = None) -> None:
    """Check the schema is current; upgrade it first when ``auto_upgrade`` (embedded SQLite).

    Two processes starting at once on a fresh SQLite file take turns through a file lock (on
    PostgreSQL, :func:`upgrade` takes an advisory lock).
    """
    if current_revision(engine) == head_revision(engine):
        return
    if not auto_upgrade:
        raise SchemaOutdated(
            "the database schema is not current: run `keeper db upgrade` first"
        )
    # The file lock is for SQLite files only: a PostgreSQL URL's database is a name, not a path.
    path = sqlite_path(str(engine.url)) if is_sqlite(str(engine.url)) else None
    with _file_lock(path) if path else contextlib.nullcontext():
        if current_revision(engine) != head_revision(engine):
            upgrade(engine, cipher=cipher)
