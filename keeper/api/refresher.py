"""Stale tokens refreshed on ``keeper serve``'s event loop, their database work batched.

A token request that finds its token stale does not take a handler thread. It joins the grant's
*flight* (one per grant and ``min_valid``: requests at once for one stale token make one
refresh call), and the flights that came in together are handled as a sweep handles its
grants, in three steps that each serve every flight waiting for them:

1. **claim**: one ``UPDATE … RETURNING`` leases the grants still free and still stale
   (:meth:`~keeper.store.leases.Leases.claim_stale`);
2. **call**: each claimed grant's refresh, a task on the loop (the sweep's
   :meth:`~keeper.sweep.worker.Worker.work_async`: the quota gate, the policy, the answer's
   classification);
3. **write**: the results that came back meanwhile, committed by lease in one transaction
   (:meth:`~keeper.api.tokens.TokenDesk.store_all`: journaled if the database fails), the
   leases of those that changed nothing given back.

A step runs while the previous batch's next step does (claims never wait for writes), and at
most one of each at a time: under load a statement is shared by the refreshes that arrived
during the last one. The database work runs in two threads of its own, never on the loop.

Whatever this path cannot settle by itself answers ``None``, and the caller takes the threaded
path (:meth:`~keeper.api.tokens.TokenDesk.token`), which reads the row again and waits for the
grant: another process holds it, or refreshed it since it was read, or a newer login replaced
it while the refresh was under way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from keeper.api.tokens import Token, TokenDesk, kept, stored_token
from keeper.core.models import REAUTH, Grant
from keeper.errors import StoreError
from keeper.store.grants import Store
from keeper.store.rows import GrantWrite, new_lease_id
from keeper.sweep.worker import Result, Worker

T = TypeVar("T")

#: How long a claim or a write waits for more work to join it before it runs: under load a
#: statement then serves the refreshes of those milliseconds, not the one or two that came
#: during the last statement (a tenth of WeChat's usual 50 ms, twice per refresh).
BATCH_WINDOW_S = 0.005
#: (grant id, min_valid seconds): requests that share a flight.
Key = tuple[int, int]


class Refresher:
    """On-demand refreshes for one server process, on its event loop (see the module)."""

    def __init__(self, *, store: Store, desk: TokenDesk, worker: Worker, lease_s: float,
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.desk = desk
        self.worker = worker
        self.lease_s = lease_s
        self.clock = clock
        self._flights: dict[Key, asyncio.Future[Token | None]] = {}
        self._to_claim: list[Key] = []
        self._to_write: list[tuple[Key, Grant, str, Result]] = []
        self._claiming = self._writing = False
        self._calls: set[asyncio.Task[None]] = set()
        # Two threads: a claim and a write can be under way at once.
        self._db = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="refresh-db")

    async def token(self, grant_id: int, min_valid_s: int) -> Token | None:
        """The grant's token, refreshed: ``None`` when the caller must take the threaded path
        (see the module). Raises :class:`~keeper.api.tokens.MustReauthorize` or
        :class:`~keeper.api.tokens.Unavailable`, as the threaded path does."""
        key = (grant_id, min_valid_s)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = asyncio.get_running_loop().create_future()
            self._to_claim.append(key)
            if not self._claiming:
                self._claiming = True
                self._spawn(self._claim())
        # A request that goes away (its client hung up) leaves the flight to the others.
        return await asyncio.shield(flight)

    def close(self) -> None:
        """After the server stopped taking requests: calls still under way are cancelled by
        the loop's end; their leases lapse."""
        self._db.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def _settle(self, key: Key, *, token: Token | None = None,
                error: BaseException | None = None) -> None:
        flight = self._flights.pop(key, None)
        if flight is None or flight.done():
            return
        if error is not None:
            flight.set_exception(error)
            flight.exception()  # read here: a flight nobody awaits any more logs nothing
        else:
            flight.set_result(token)

    async def _claim(self) -> None:
        try:
            while self._to_claim:
                await asyncio.sleep(BATCH_WINDOW_S)  # the flights arriving meanwhile join
                keys, self._to_claim = self._to_claim, []
                by_margin: dict[int, list[int]] = {}
                for grant_id, margin in keys:
                    by_margin.setdefault(margin, []).append(grant_id)
                for margin, ids in by_margin.items():
                    await self._claim_some(ids, margin)
        finally:
            self._claiming = False

    async def _claim_some(self, ids: list[int], margin: int) -> None:
        now = self.clock()
        lease_id = new_lease_id()
        try:
            leased = await self._run(
                self.store.claim_stale, ids, lease_id=lease_id, lease_s=self.lease_s,
                now=now, expiring_by=now + timedelta(seconds=margin))
        except StoreError:
            leased = []  # the threaded path reads again and says what it finds
        claimed = {g.id for g in leased}
        for grant_id in ids:
            if grant_id not in claimed:
                self._settle((grant_id, margin))  # held elsewhere, or refreshed meanwhile
        for grant in leased:
            self._spawn(self._call((grant.id, margin), grant, lease_id))

    async def _call(self, key: Key, grant: Grant, lease_id: str) -> None:
        try:
            result = await self.worker.work_async(grant, profile_reads=False,
                                                  force_refresh=True)
        except BaseException as e:
            self._settle(key, error=e)
            raise
        self._to_write.append((key, grant, lease_id, result))
        if not self._writing:
            self._writing = True
            self._spawn(self._write())

    async def _write(self) -> None:
        try:
            while self._to_write:
                await asyncio.sleep(BATCH_WINDOW_S)
                batch, self._to_write = self._to_write, []
                await self._write_some(batch)
        finally:
            self._writing = False

    async def _write_some(self, batch: list[tuple[Key, Grant, str, Result]]) -> None:
        keep: list[tuple[GrantWrite, str]] = []
        back: dict[str, list[int]] = {}
        for _, grant, lease_id, r in batch:
            write = kept(r)
            if write is not None:
                keep.append((write, lease_id))
            else:
                # Nothing WeChat said changes the grant: it goes back as it was.
                back.setdefault(lease_id, []).append(grant.id)

        def commit() -> set[int]:
            for lease_id, ids in back.items():
                with contextlib.suppress(StoreError):  # else the leases lapse
                    self.store.release(ids, lease_id)
            return self.desk.store_all(keep)

        failure: StoreError | None = None
        try:
            written = await self._run(commit)
        except StoreError as e:
            written, failure = set(), e
        for key, grant, _, r in batch:
            write = kept(r)
            if write is None:
                self._settle(key, error=self.desk.failed(r))
            elif failure is not None:
                self._settle(key, error=failure)  # neither committed nor journaled
            elif grant.id not in written:
                self._settle(key)  # superseded: read what is stored now
            elif write.grant.state == REAUTH and write.doubtful:
                self._spawn(self._doubtful(key, grant, write))
            else:
                try:
                    self._settle(key, token=stored_token(write, grant.openid))
                except Exception as e:
                    self._settle(key, error=e)

    async def _doubtful(self, key: Key, grant: Grant, write: GrantWrite) -> None:
        """A 40030/42002 about the tokens the work began with: recorded, or held for an
        earlier holder? The stored row says (see :func:`~keeper.api.tokens.stored_token`)."""
        try:
            await self._run(self.desk.read, grant.appid, grant.openid)
            self._settle(key, token=stored_token(write, grant.openid))
        except Exception as e:
            self._settle(key, error=e)
