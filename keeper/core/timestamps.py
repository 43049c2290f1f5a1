"""The one form of a time on keeper's wire: the API's documents and errors, the events' bodies
and the JSON outputs of the commands all show a time as RFC 3339 in UTC, to the whole second,
with a ``Z``: ``2026-11-30T08:00:00Z``. One form, so that an application comparing the same
record's time from two of them sees equal strings.

Whole seconds: no time keeper shows needs a finer grain (a token's expiry, when a record or
an event was written, when a profile was read), and a fraction would differ between a time
held in memory and the same time read back from a database that rounds. The fraction is cut,
never rounded up: an expiry is never shown later than it is.

Here, in the pure core, rather than beside ``keeper.clock.utcnow``: the core (events) needs it,
and the core imports nothing of keeper's but its errors.
"""

from __future__ import annotations

from datetime import UTC, datetime


def timestamp(value: datetime) -> str:
    """``value`` (timezone-aware) as ``YYYY-MM-DDTHH:MM:SSZ``, in UTC, the fraction cut."""
    if value.tzinfo is None:
        raise ValueError("a naive datetime has no place on the wire; keeper uses aware UTC")
    # isoformat, not strftime: half the CPU (every token answer shows one), and the year in
    # four digits always (glibc's %Y drops the zeros of a year before 1000).
    return value.astimezone(UTC).isoformat(timespec="seconds").removesuffix("+00:00") + "Z"


def timestamp_or_none(value: datetime | None) -> str | None:
    return None if value is None else timestamp(value)


def json_default(value: object) -> str:
    """``json.dumps``'s ``default`` for JSON outputs: a time as :func:`timestamp`, anything
    else JSON cannot hold as its text."""
    if isinstance(value, datetime):
        return timestamp(value)
    return str(value)
