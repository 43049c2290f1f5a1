"""The delivery loop: for each webhook, one process at a time sends its due events, oldest due
first, one at a time, on threads of its own (never the sweep's workers: a receiver that is down
or slow never slows a sweep).

A process holds a webhook through a lease row (:mod:`keeper.store.deliveries`), renewed while
it works; losing it stops that webhook's loop until it is taken again. An attempt lasts at most
:func:`attempt_bound` (the sender's deadline, the webhook's ``timeout``, plus a margin) and
starts only while the lease held has more than that left: the lease is renewed first
otherwise, and if renewing took so long that too little is left even so, no attempt starts in
that round. So no attempt outlives its lease, and a live process never has its webhook taken
over while an attempt of its is in flight. A process frozen between that check and the end of
its attempt (a stopped VM) can still overrun its lease and have another send the same event at
the same time: at-least-once delivery and the event id allow that.

A failed attempt is rescheduled (:func:`keeper.core.events.next_attempt`), so one event a
receiver refuses never blocks the others; after 72 hours of attempts it is failed. A database
outage is operations, not a crash: one ``database.unavailable`` line per outage, a pause, and
the loop goes on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import structlog

from keeper.clock import utcnow
from keeper.config.webhooks import WebhookConfig
from keeper.core.events import next_attempt
from keeper.errors import StoreError
from keeper.events.sender import Outcome, Sender
from keeper.store.deliveries import DELIVERED, FAILED, PENDING, Due
from keeper.store.grants import Store

log = structlog.get_logger("keeper.events")

#: How often an idle webhook looks for new events (a sweep's write also wakes it at once).
POLL_S = 0.5
#: Due deliveries read at once (then sent one by one, the lease checked before each).
BATCH = 50
#: How often delivered events past the retention are pruned.
PRUNE_EVERY_S = 600.0
#: What an attempt may last past its deadline: closing the connection, the thread waking.
ATTEMPT_MARGIN_S = 1.0


def attempt_bound(hook: WebhookConfig) -> float:
    """The longest one attempt to ``hook`` lasts: the sender's deadline is the webhook's
    ``timeout`` (:mod:`keeper.events.sender`), and then the connection is closed."""
    return hook.timeout_s + ATTEMPT_MARGIN_S


def lease_for(hook: WebhookConfig) -> float:
    """A webhook lease: at least 30 s, and four timeouts. It is renewed once half is left,
    which is always more than an attempt's bound (timeout 0.1 to 60 s: half is 15 s, or 2 x
    timeout), so the rule that an attempt needs more than its bound left only holds delivery
    back when renewing was slow."""
    return max(30.0, 4 * hook.timeout_s)


def _dead_local_holder(holder: str | None) -> str | None:
    """``holder`` if it names a process of this host that no longer exists (a kill -9): its
    webhook is taken over at once instead of after its lease lapses."""
    parts = (holder or "").rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    pid = int(parts[1])
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return holder
    except PermissionError:  # alive, another user's
        return None
    return None


class Deliverer:
    """Delivers events to ``webhooks``. ``stop`` ends the loops (after the attempt in flight).

    ``clock`` is the time of decisions (what is due, when to retry); signatures carry the
    wall clock of the attempt, as receivers compare it with theirs.
    """

    def __init__(
        self, *, store: Store, webhooks: Sequence[WebhookConfig], stop: threading.Event,
        retention_s: float, clock: Callable[[], datetime] = utcnow, poll_s: float = POLL_S,
    ) -> None:
        self.store = store
        self.webhooks = tuple(webhooks)
        self.stop = stop
        self.retention_s = retention_s
        self.clock = clock
        self.poll_s = poll_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.senders = {h.key: Sender(h) for h in self.webhooks}
        self._wake = {h.key: threading.Event() for h in self.webhooks}
        self._held_until: dict[str, datetime] = {}
        self._top: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._last_prune = 0.0

    # -- one webhook ---------------------------------------------------------------------

    def _hold(self, hook: WebhookConfig, now: datetime, *, need_s: float = 0.0) -> bool:
        """Hold the webhook's lease, renewing it once half is spent or no more than
        ``need_s`` is left; whether it is held. The lease is counted from ``now``, taken
        before the database is asked: it lapses no sooner (on PostgreSQL it runs from the
        database's clock, when the UPDATE ran)."""
        lease_s = lease_for(hook)
        until = self._held_until.get(hook.key)
        if until is not None and (until - now).total_seconds() > max(lease_s / 2, need_s):
            return True
        held = self.store.take_webhook(hook.key, self.holder, now=now, lease_s=lease_s)
        if not held:
            dead = _dead_local_holder(self.store.webhook_holder(hook.key))
            if dead is not None:
                held = self.store.take_webhook(hook.key, self.holder, now=now,
                                               lease_s=lease_s, takeover=dead)
        if held:
            self._held_until[hook.key] = now + timedelta(seconds=lease_s)
        else:
            self._held_until.pop(hook.key, None)
        return held

    def deliver_due(self, hook: WebhookConfig) -> Counter[str]:
        """Send the webhook's due events, one at a time, until none is due, the lease is
        lost or ``stop`` is set. Raises StoreError when the database fails."""
        counts: Counter[str] = Counter()
        sender = self.senders[hook.key]
        while not self.stop.is_set():
            now = self.clock()
            if not self._hold(hook, now):
                counts["busy"] += 1
                break
            top = self.store.events_top()
            if top != self._top.get(hook.key):
                passed = self.store.fan_out(hook.key, self.holder, hook.events, now=now)
                if passed is None:  # the lease was lost after all
                    self._held_until.pop(hook.key, None)
                    break
                if passed < 1000:
                    self._top[hook.key] = top
                if passed:
                    continue
            batch = self.store.due(hook.key, now, limit=BATCH)
            if not batch:
                break
            bound = attempt_bound(hook)
            for due in batch:  # one at a time, each inside the lease (the module's docstring)
                if self.stop.is_set() or not self._hold(hook, self.clock(), need_s=bound):
                    break
                if (self._held_until[hook.key] - self.clock()).total_seconds() <= bound:
                    return counts  # renewing took most of the lease: the next round renews
                began = time.monotonic()
                outcome = sender.send(due.event_id, due.body, t=int(time.time()))
                counts[self._settle(hook, due, outcome, time.monotonic() - began)] += 1
        return counts

    def _settle(self, hook: WebhookConfig, due: Due, outcome: Outcome, took_s: float) -> str:
        now = self.clock()
        attempt = due.attempts + 1
        where = {"webhook": hook.key, "host": hook.host, "event_id": due.event_id,
                 "type": due.type, "attempt": attempt, "status": outcome.status}
        if outcome.delivered:
            self.store.settle(hook.key, due, now=now, state=DELIVERED, next_attempt_at=None,
                              status=outcome.status, error=None)
            log.info("event.delivered", **where, ms=round(took_s * 1000, 1))
            return "delivered"
        retry_at = next_attempt(attempt, due.first_try_at, now)
        if retry_at is None:
            self.store.settle(hook.key, due, now=now, state=FAILED, next_attempt_at=None,
                              status=outcome.status, error=outcome.error)
            log.error("event.failed", **where, error=outcome.error)
            return "failed"
        self.store.settle(hook.key, due, now=now, state=PENDING, next_attempt_at=retry_at,
                          status=outcome.status, error=outcome.error)
        log.info("event.retry", **where, error=outcome.error,
                 retry_in_s=round((retry_at - now).total_seconds(), 1))
        return "retry"

    def release(self, hook: WebhookConfig) -> None:
        if self._held_until.pop(hook.key, None) is not None:
            self.store.release_webhook(hook.key, self.holder)

    def prune(self) -> int:
        """Forget events past the retention that no webhook still has to send."""
        self._last_prune = time.monotonic()
        return self.store.prune_events(self.clock(), self.retention_s)

    # -- `keeper events deliver` -----------------------------------------------------------

    def deliver_all(self) -> Counter[str]:
        """What is due now, for every webhook (a webhook another process holds is left to
        it), then give the leases back."""
        counts: Counter[str] = Counter()
        for hook in self.webhooks:
            try:
                counts += self.deliver_due(hook)
            finally:
                self.release(hook)
        self.prune()
        return counts

    # -- `keeper run`: a thread per webhook ------------------------------------------------

    def poke(self) -> None:
        """New events were committed in this process: look now, not at the next poll."""
        for wake in self._wake.values():
            wake.set()

    def start(self) -> None:
        for hook in self.webhooks:
            t = threading.Thread(target=self._loop, args=(hook,), daemon=True,
                                 name=f"keeper-events-{hook.key}")
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._housekeeping, daemon=True, name="keeper-events-prune")
        t.start()
        self._threads.append(t)

    def _loop(self, hook: WebhookConfig) -> None:
        failures = 0
        try:
            while not self.stop.is_set():
                pause = self.poll_s
                try:
                    self.deliver_due(hook)
                    if failures:
                        log.info("database.recovered", after_failures=failures,
                                 webhook=hook.key)
                    failures = 0
                except StoreError as e:
                    failures += 1
                    self._held_until.pop(hook.key, None)
                    pause = min(30.0, 2.0 ** failures)
                    # Once per outage at error level; the attempts after it at debug.
                    (log.error if failures == 1 else log.debug)(
                        "database.unavailable", error=str(e), webhook=hook.key,
                        failures=failures, retry_in_s=pause)
                except Exception:  # a bug must not end delivery for good
                    log.exception("events.crashed", webhook=hook.key)
                    pause = 5.0
                wake = self._wake[hook.key]
                if wake.wait(pause):
                    wake.clear()
        finally:
            with contextlib.suppress(StoreError):  # else the lease lapses by itself
                self.release(hook)

    def _housekeeping(self) -> None:
        while not self.stop.wait(1.0):
            if time.monotonic() - self._last_prune < PRUNE_EVERY_S:
                continue
            try:
                self.prune()
            except StoreError:
                self._last_prune = time.monotonic()  # the loops report the outage

    def join(self, deadline: float) -> bool:
        """Wait (until the monotonic ``deadline``) for the loops to end after ``stop``;
        whether all did. An attempt still in flight then is sent again later."""
        self.poke()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """Close the connections and the store (the deliverer's own)."""
        for sender in self.senders.values():
            sender.close()
        self.store.close()
