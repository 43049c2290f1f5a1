"""The database's clock: the one clock that decisions several hosts must agree on use.

A lease's end, whether a lease has lapsed and a quota permit's "now" are shared decisions:
hosts whose clocks differ by 90 s would otherwise each see another's lease lapse early, or
take permits that the others' arithmetic places in the future. On PostgreSQL these decisions
read the server's ``clock_timestamp()`` inside the statement (or the transaction) that acts on
them. SQLite serves one host: there the process's clock *is* the database's clock, and the
``now`` the caller passes (the process clock, or a test's) is used as it is.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Float, bindparam, cast, func

from keeper.store.schema import UTCDateTime


def db_now(sqlite: bool, name: str) -> Any:
    """The database's "now" in a statement: ``clock_timestamp()`` on PostgreSQL (the time the
    statement reads it, not its transaction's start); on SQLite the bound parameter ``name``,
    given at execution by :func:`clock_params`."""
    if sqlite:
        return bindparam(name, type_=UTCDateTime())
    return func.clock_timestamp()


def db_later(sqlite: bool, name: str) -> Any:
    """The database's "now" plus a number of seconds (a lease's end). PostgreSQL: the bound
    parameter ``name`` holds the seconds; SQLite: it holds the end itself (see
    :func:`clock_params`)."""
    if sqlite:
        return bindparam(name, type_=UTCDateTime())
    seconds = bindparam(name, type_=Float())
    return func.clock_timestamp() + func.make_interval(0, 0, 0, 0, 0, 0, seconds)


def clock_params(sqlite: bool, now: datetime, lease_s: float, *, now_name: str,
                 later_name: str) -> dict[str, Any]:
    """The values of :func:`db_now` and :func:`db_later`'s parameters: on SQLite ``now`` and
    ``now + lease_s``; on PostgreSQL only the seconds (``now`` is not used: the server's clock
    decides)."""
    if sqlite:
        return {now_name: now, later_name: now + timedelta(seconds=lease_s)}
    return {later_name: float(lease_s)}


def db_now_us() -> Any:
    """PostgreSQL's clock in whole microseconds since the epoch (the GCRA's unit)."""
    return cast(func.floor(func.extract("epoch", func.clock_timestamp()) * 1_000_000),
                BigInteger)
