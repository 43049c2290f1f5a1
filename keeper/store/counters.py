"""Sequences in the ``counters`` table: numbers that follow commit order."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from keeper.store.schema import counters


def take_seqs(conn: Any, name: str, n: int) -> range:
    """``n`` numbers of the sequence ``name``, in order. The counter's row stays locked until
    the transaction ends, so transactions that take numbers commit in the order of their
    numbers: a reader that sees number k has already seen every number below it."""
    top = conn.execute(
        update(counters).where(counters.c.name == name)
        .values(value=counters.c.value + n).returning(counters.c.value)
    ).scalar_one()
    return range(int(top) - n + 1, int(top) + 1)
