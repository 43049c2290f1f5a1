"""Access tokens on demand: one that expires soon is refreshed first, under the grant's lease
and the shared quota, and many requests at once for one stale token make one refresh call.

Within a process, requests for one grant queue behind a lock of that grant's own (a *flight*):
the first refreshes, the rest then read its result. Across processes the grant's lease decides:
a process that finds the grant leased by another (a sweep, another ``keeper serve``) polls the
row until that work is written, then takes the new token.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from keeper.core.models import REAUTH, Reauth
from keeper.errors import DatabaseUnavailable, KeeperError, StoreError
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite, new_lease_id
from keeper.store.users import TokenRow
from keeper.sweep.journal import Journal
from keeper.sweep.worker import Result, Worker

log = structlog.get_logger("keeper.tokens")

#: While another process holds the grant, a token valid at least this long is handed out at
#: once instead of waiting for that process (unless the caller asked for more).
BUSY_FLOOR_S = 60.0
#: After a failed refresh (WeChat down, a garbled answer): how long the caller should wait.
RETRY_AFTER_S = 5


class NoGrant(KeeperError):
    """keeper holds no grant for this user."""


class MustReauthorize(KeeperError):
    """The grant is dead; ``record`` says why (``None`` if the record went missing)."""

    def __init__(self, openid: str, record: Reauth | None) -> None:
        reason = record.reason if record else "other"
        errcode = record.errcode if record else None
        super().__init__(f"user {openid} must re-authorize: {reason} (errcode {errcode})")
        self.record = record


class Unavailable(KeeperError):
    """No valid token now, not for the user's fault: WeChat down, the quota used up, the grant
    held by another process past the wait, the database failing. ``retry_after_s``: when to
    ask again. ``code``: the API's error code."""

    def __init__(self, message: str, *, retry_after_s: float, code: str = "wechat_unavailable"):
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s + 0.999))
        self.code = code


@dataclass(frozen=True)
class Token:
    access_token: str
    expires_at: datetime
    scope: str
    refreshed: bool  # this request made the refresh call


class _Flights:
    """One lock per grant being refreshed in this process, dropped when nobody holds it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, grant_id: int, timeout_s: float) -> Iterator[bool]:
        with self._guard:
            lock, users = self._locks.get(grant_id, (threading.Lock(), 0))
            self._locks[grant_id] = (lock, users + 1)
        got = lock.acquire(timeout=max(0.0, timeout_s))
        try:
            yield got
        finally:
            if got:
                lock.release()
            with self._guard:
                lock, users = self._locks[grant_id]
                if users <= 1:
                    del self._locks[grant_id]
                else:
                    self._locks[grant_id] = (lock, users - 1)


class TokenDesk:
    """Hands out valid access tokens, refreshing them when needed."""

    def __init__(
        self, *, store: Store, worker: Worker, lease_s: float, wait_s: float,
        journal: Journal | None = None, clock: Callable[[], datetime],
        poll_s: float = 0.025,
    ) -> None:
        self.store = store
        self.worker = worker
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.journal = journal
        self.clock = clock
        self.poll_s = poll_s
        self._flights = _Flights()

    def token(self, appid: str, openid: str, *, min_valid_s: float,
              busy_floor_s: float = BUSY_FLOOR_S, row: TokenRow | None = None) -> Token:
        """A token valid for at least ``min_valid_s`` more seconds. ``row``: the grant's row
        as just read by the caller (saves reading it again).

        Raises :class:`NoGrant`, :class:`MustReauthorize` or :class:`Unavailable`.
        """
        if row is None or row.state == REAUTH:
            row = self.read(appid, openid)
        if self.fresh(row, min_valid_s):
            return Token(row.access_token, row.access_expires_at, row.scope, False)
        deadline = time.monotonic() + self.wait_s
        with self._flights.hold(row.id, deadline - time.monotonic()) as got:
            if not got:
                raise self._busy(openid)
            pause = self.poll_s
            while True:
                # The lease is taken only while the token is still stale, so whoever held the
                # flight before (or another process) having refreshed it makes this None.
                token = self._refresh(appid, openid, min_valid_s)
                if token is not None:
                    return token
                row = self.read(appid, openid)
                if self.fresh(row, min_valid_s):
                    return Token(row.access_token, row.access_expires_at, row.scope, False)
                # Another process holds the grant: its token may do meanwhile.
                if self.fresh(row, min(min_valid_s, busy_floor_s)):
                    return Token(row.access_token, row.access_expires_at, row.scope, False)
                if time.monotonic() + pause > deadline:
                    raise self._busy(openid)
                time.sleep(pause)
                pause = min(pause * 1.5, 0.25)

    def _busy(self, openid: str) -> Unavailable:
        return Unavailable(f"grant {openid} stayed busy in another keeper process; try again",
                           retry_after_s=2, code="grant_busy")

    def read(self, appid: str, openid: str) -> TokenRow:
        try:
            row = self.store.token_row(appid, openid)
        except DatabaseUnavailable as e:
            raise Unavailable(f"the database is unavailable: {e}", retry_after_s=RETRY_AFTER_S,
                              code="database_unavailable") from None
        if row is None:
            raise NoGrant(f"no grant for openid {openid} of app {appid}: the user must log in")
        if row.state == REAUTH:
            raise MustReauthorize(openid, self.store.reauth_record(row.id))
        return row

    def fresh(self, row: TokenRow, min_valid_s: float) -> bool:
        """Whether the row's token stays valid ``min_valid_s`` seconds more."""
        return row.access_expires_at > self.clock() + timedelta(seconds=min_valid_s)

    def _refresh(self, appid: str, openid: str, min_valid_s: float) -> Token | None:
        """Lease the grant and refresh it; ``None`` when another process holds it, or has
        refreshed it since it was read (the lease is taken only while the token is stale)."""
        now = self.clock()
        lease_id = new_lease_id()
        leased = self.store.claim_one(
            appid, openid, lease_id=lease_id, lease_s=self.lease_s,
            now=now, expiring_by=now + timedelta(seconds=min_valid_s))
        if leased is None:
            return None
        result = self.worker.work(leased, profile_reads=False, force_refresh=True)
        write = kept(result)
        if write is None:
            # Nothing WeChat said changes the grant (it did not answer, or the quota is used
            # up): the grant goes back as it was; the sweep keeps its own schedule.
            self.store.release([leased.id], lease_id)
            raise self.failed(result)
        if not self._store(write, lease_id):
            return None  # superseded (a new login, a delete): read what is stored now
        if write.grant.state == REAUTH and write.doubtful:
            self.read(appid, openid)  # raises MustReauthorize if it was recorded
        return stored_token(write, openid)

    def failed(self, result: Result) -> Unavailable:
        """What a caller is told when WeChat's answer changed nothing (no answer, a transient
        error, the quota used up): try again, and when."""
        write = result.write
        if result.quota_wait is not None:
            wait = self.worker.gate.seconds_until(result.quota_wait.until)
            return Unavailable(str(result.quota_wait), retry_after_s=wait,
                               code="quota_exhausted")
        if write is not None and write.grant.retry_at is not None and (
                write.grant.last_error or "").startswith("450"):
            # A pause's end, placed by the database's clock.
            wait = self.worker.gate.seconds_until(write.grant.retry_at)
            return Unavailable("WeChat's refresh quota is used up", retry_after_s=wait,
                               code="quota_exhausted")
        detail = (write.grant.last_error if write is not None else None) or (
            result.db_error and "database unavailable") or "no answer"
        return Unavailable(f"WeChat could not refresh the access token now ({detail})",
                           retry_after_s=RETRY_AFTER_S)

    def _store(self, write: GrantWrite, lease_id: str) -> bool:
        """Commit what WeChat answered; if the database fails, journal it (it is replayed by
        the next keeper process, and by this one's replay thread). False: superseded."""
        return bool(self.store_all([(write, lease_id)]))

    def store_all(self, results: Sequence[tuple[GrantWrite, str]]) -> set[int]:
        """Commit results of on-demand refreshes (each with its lease), one transaction per
        lease; the grant ids written, superseded ones left out. If the database fails, every
        result not committed is journaled (replayed by the next keeper process, and by this
        one's replay thread) and counts as written; if the journal fails too, the database's
        error is raised."""
        by_lease: dict[str, list[GrantWrite]] = {}
        for write, lease_id in results:
            by_lease.setdefault(lease_id, []).append(write)
        written: set[int] = set()
        for lease_id, writes in by_lease.items():
            try:
                self.store.apply(writes, lease_id, self.clock(), written)
            except StoreError as e:
                if self.journal is None:
                    raise
                rest = [(w, lid) for w, lid in results if w.grant.id not in written]
                try:
                    path = self.journal.write(rest)
                except OSError as disk:
                    log.error("journal.failed", lost=len(rest), error=f"{type(disk).__name__}: "
                              f"{disk.strerror or disk}", directory=str(self.journal.directory))
                    raise e from None
                log.warning("journal.saved", results=len(rest), file=str(path), error=str(e))
                return written | {w.grant.id for w, _ in rest}
        return written


def kept(result: Result) -> GrantWrite | None:
    """What an on-demand refresh commits: WeChat's answer when it changes the grant, or
    ``None`` when it does not (no answer, a transient error, the quota used up), and the
    grant goes back as it was (the sweep keeps its own schedule)."""
    if result.write is None or result.counts["transient_failures"]:
        return None
    return result.write


def stored_token(write: GrantWrite, openid: str) -> Token:
    """The token a committed on-demand refresh hands out, or the re-authorization it found.

    A doubtful one (40030/42002 about the tokens the work began with) may have been held for
    an earlier holder rather than recorded: the caller reads the row first (it raises
    :class:`MustReauthorize` if the record was made), and only then calls this."""
    if write.grant.state == REAUTH:
        if write.doubtful:
            # The store held this answer for an earlier holder (a takeover from a lapsed
            # lease): nothing is recorded, and the caller must not be told either.
            raise Unavailable(f"grant {openid} waits for another keeper process that may "
                              "hold newer tokens; try again", retry_after_s=2,
                              code="grant_busy")
        raise MustReauthorize(openid, write.reauth)
    g = write.grant
    return Token(g.access_token, g.access_expires_at, g.scope, True)
