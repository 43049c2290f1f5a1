"""The work on one leased grant: refresh it if due, read its profile if due.

Runs as a task on the process's event loop (:mod:`keeper.loop`); a thread can run one and wait
for it (:meth:`Worker.work`). Takes WeChat's answers, applies the policy, and returns the
grant's new state for the sweep to write; never touches the database except through the quota
gate, which asks it from a thread.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import structlog

from keeper.config import Config
from keeper.core.models import Grant, Profile, Reauth
from keeper.core.policy import (
    ACCESS,
    PROFILE_FAILING_AFTER,
    Lifetime,
    access_stale,
    after_profile_failure,
    after_profile_read,
    after_reauth,
    after_refresh,
    after_transient,
    confirm_held,
    held_answer,
    profile_due,
    refresh_reason,
    schedule,
)
from keeper.errors import (
    AnswerMismatch,
    AppConfigRejected,
    KeeperBugAnswer,
    NoProfile,
    QuotaExceeded,
    ReauthRequired,
    StaleAccessToken,
    StoreError,
    TransientApiError,
)
from keeper.limiter import QuotaGate, QuotaWait, Stopped
from keeper.loop import EventLoop
from keeper.store.rows import GrantWrite
from keeper.wechat.aio import AsyncWeChatClient

# Named as before the re-layout: the name is in every log line ("logger"), which stays.
log = structlog.get_logger("keeper.worker")

#: A worker waits this long at most for a quota permit; a longer pause (45011 until the next
#: minute, 45009 until midnight) defers the app's grants to a later sweep instead.
QUOTA_MAX_WAIT_S = 10.0



@dataclass
class Result:
    """What working one grant produced: a write, or a lease to give back, and counts.

    ``db_error``: the database failed during the work (the quota gate reads it); whatever
    WeChat had answered before is still in ``write``. ``bug``: WeChat said keeper sent a bad
    parameter (the sweep logs it once per endpoint and code).
    """

    grant: Grant
    write: GrantWrite | None = None
    counts: Counter[str] = field(default_factory=Counter)
    rejected_app: AppConfigRejected | None = None
    quota_wait: QuotaWait | None = None
    db_error: str | None = None
    bug: KeeperBugAnswer | None = None


@dataclass
class _Progress:
    """A grant as WeChat's answers so far left it: what a failure later in the work keeps."""

    grant: Grant
    answered: bool = False  # some answer changed the grant: it must be written
    profile: Profile | None = None
    record: Reauth | None = None
    clear: bool = False
    stage: str = "refresh"  # the call under way: "refresh" or "profile"


class Worker:
    """Does the WeChat calls for grants, as tasks on ``loop`` (where ``client`` belongs)."""

    def __init__(
        self, *, config: Config, client: AsyncWeChatClient, gate: QuotaGate,
        stop: threading.Event, clock: Callable[[], datetime], loop: EventLoop,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.loop = loop
        self.gate = gate
        self.stop = stop
        self.clock = clock
        self.rng = rng or random.Random()
        #: Set by a sweep that gave up on WeChat: grants still queued go back untouched.
        self.halt = threading.Event()
        self.clocks = {a.appid: config.lifetime(a) for a in config.apps}
        #: The longest a call waits for a quota permit (an API request waits less).
        self.quota_wait_s = QUOTA_MAX_WAIT_S

    async def _refresh(self, p: _Progress, counts: Counter[str], reason: str) -> None:
        g = p.grant
        p.stage = "refresh"
        await self.gate.acquire_async(g.appid, "refresh", max_wait_s=self.quota_wait_s)
        answer = await self.client.refresh(g.appid, g.refresh_token)
        if answer.openid != g.openid:
            # Never store (or hand out) another user's token as this one's.
            log.error("wechat.openid_mismatch", appid=g.appid, openid=g.openid,
                      answered_openid=answer.openid, endpoint="refresh")
            raise AnswerMismatch("refresh", None, "answer is about another openid")
        now = self.clock()
        result = after_refresh(g, answer, self.clocks[g.appid], now)
        # From here on the new tokens travel with the grant until they are committed.
        p.grant, p.answered = result.grant, True
        p.record, p.clear = result.reauth or p.record, result.clear_reauth or p.clear
        counts["access_tokens_refreshed" if reason == ACCESS else "refresh_tokens_refreshed"] += 1
        if result.renewed:
            counts["refresh_tokens_renewed"] += 1
        if result.reauth is not None:
            counts["refresh_tokens_expiring"] += 1
            counts["reauth_recorded"] += 1
            log.info("reauth.recorded", appid=g.appid, openid=g.openid,
                     reason=result.reauth.reason, errcode=None)

    async def _userinfo(self, p: _Progress) -> Profile:
        g = p.grant
        p.stage = "profile"
        await self.gate.acquire_async(g.appid, "userinfo", max_wait_s=self.quota_wait_s)
        data = await self.client.userinfo(g.access_token, g.openid, self.config.userinfo_lang,
                                          appid=g.appid)
        answered = data.get("openid")
        if answered is not None and answered != g.openid:
            log.error("wechat.openid_mismatch", appid=g.appid, openid=g.openid,
                      answered_openid=str(answered)[:128], endpoint="userinfo")
            raise AnswerMismatch("userinfo", None, "answer is about another openid")
        return Profile.from_answer(data, self.clock())

    async def _profile(self, p: _Progress, counts: Counter[str]) -> None:
        try:
            try:
                profile = await self._userinfo(p)
            except StaleAccessToken:
                # WeChat no longer takes this access token: refresh it, then try once more.
                counts["stale_access_tokens"] += 1
                await self._refresh(p, counts, ACCESS)
                try:
                    profile = await self._userinfo(p)
                except StaleAccessToken as e:
                    # Refused again right after a refresh: not the user's fault, not ours to
                    # settle now. The refresh is kept; the profile is read later.
                    raise TransientApiError(e.endpoint, e.errcode, "access token refused "
                                            "right after a refresh") from None
        except NoProfile as e:
            now = self.clock()
            stop = e.errcode if e.errcode == 48001 else None
            counts["no_profile"] += 1
            p.grant = replace(after_profile_read(p.grant, now), profile_stop=stop)
            p.profile, p.answered = Profile(fetched_at=now, errcode=e.errcode), True
            return
        counts["profiles_fetched"] += 1
        p.grant = replace(after_profile_read(p.grant, profile.fetched_at),
                          unionid=profile.unionid or p.grant.unionid)
        p.profile, p.answered = profile, True

    def _profile_failed(self, p: _Progress, kind: str, counts: Counter[str],
                        not_before: datetime | None = None) -> None:
        """Only the profile waits: the grant's token refreshes keep their schedule."""
        before = p.grant.profile_failures
        p.grant = after_profile_failure(p.grant, kind, self.clock(), not_before=not_before,
                                        rng=self.rng)
        p.answered = True
        counts["profile_failures"] += 1
        if before < PROFILE_FAILING_AFTER <= p.grant.profile_failures:
            # Once, when it starts: the answer keeps being unusable for this user.
            log.warning("profile.failing", appid=p.grant.appid, openid=p.grant.openid,
                        failures=p.grant.profile_failures, error=kind)

    def work(
        self, grant: Grant, *, profile_reads: bool = True, force_refresh: bool = False
    ) -> Result:
        """:meth:`work_async` on the process's event loop, from a thread that waits for it."""
        return self.loop.run(self.work_async(grant, profile_reads=profile_reads,
                                             force_refresh=force_refresh))

    async def work_async(
        self, grant: Grant, *, profile_reads: bool = True, force_refresh: bool = False
    ) -> Result:
        """Bring one leased grant up to date; never raises (but CancelledError).

        Whatever fails part-way (WeChat, the quota gate's database, a bug), what WeChat
        answered before is returned in ``write``, to be stored. A failed profile read delays
        only the profile. ``profile_reads=False``: tokens only (``keeper token``);
        ``force_refresh``: refresh even when nothing is due.

        A grant holding an answer (claimed only once its hold is over) is confirmed without a
        call. A 40030 or 42002 about the tokens the work started from is held instead of
        recorded when the grant was taken over from a lapsed lease (see
        :meth:`keeper.store.leases.Leases.apply`, which also holds it if this lease is lost).
        """
        result = Result(grant)
        counts = result.counts
        clock = self.clocks.get(grant.appid)
        if clock is None or self.stop.is_set() or self.halt.is_set():
            return result
        self.client.ready()  # before any quota permit is taken
        if grant.held_errcode is not None:
            return self._confirm(result, clock)
        now = self.clock()
        p = _Progress(grant)
        hold_s: float | None = None
        try:
            reason = refresh_reason(grant, clock, now) or (ACCESS if force_refresh else None)
            if (reason is None and profile_reads and profile_due(grant, clock, now)
                    and access_stale(grant, clock, now)):
                reason = ACCESS  # on demand: a profile read needs a valid access token
            if reason:
                await self._refresh(p, counts, reason)
            if profile_reads and profile_due(p.grant, clock, self.clock()):
                await self._profile(p, counts)
        except ReauthRequired as e:
            about_start = p.grant.refresh_token == grant.refresh_token
            p.grant, p.record = after_reauth(p.grant, e.errcode, self.clock())
            if about_start and held_answer(e.errcode):
                # If an earlier holder may still write these tokens' successor, this answer
                # is held for as long as a lease: the store decides (lease lost or not).
                hold_s = self.config.lease_s
            if hold_s is not None and grant.taken_over:
                counts["reauth_held"] += 1
                log.info("reauth.held", appid=grant.appid, openid=grant.openid,
                         reason=p.record.reason, errcode=e.errcode, endpoint=e.endpoint,
                         hold_s=hold_s)
            else:
                counts["reauth_recorded"] += 1
                log.info("reauth.recorded", appid=grant.appid, openid=grant.openid,
                         reason=p.record.reason, errcode=e.errcode, endpoint=e.endpoint)
        except QuotaExceeded as e:
            counts["transient_failures"] += 1
            try:
                # The pause is placed by the database's clock (the one the quota's
                # permits are measured by), not this host's.
                until = await self.gate.pause_async(grant.appid, e.endpoint,
                                                    e.errcode or 45011)
            except StoreError as db:  # the pause is not shared; this grant still waits
                result.db_error = str(db)
                until = self.clock() + timedelta(seconds=60)
            if p.stage == "profile":
                self._profile_failed(p, str(e.errcode), counts, not_before=until)
            else:
                p.grant = after_transient(p.grant, str(e.errcode), self.clock(),
                                          not_before=until, count=False)
        except AppConfigRejected as e:
            counts["transient_failures"] += 1
            result.rejected_app = e
            p.grant = after_transient(p.grant, str(e.errcode), self.clock(), rng=self.rng,
                                      count=False)
        except TransientApiError as e:
            counts["transient_failures"] += 1
            kind = str(e.errcode) if e.errcode is not None else e.detail[:64]
            if isinstance(e, KeeperBugAnswer):
                counts["keeper_bug_answers"] += 1
                result.bug = e
            if (e.errcode is None and not isinstance(e, AnswerMismatch)) or e.errcode == -1:
                # No answer (network, timeout, 5xx, HTML) or "system busy": what tells that
                # WeChat is down. An errcode, even an odd one, is an answer.
                counts["unanswered"] += 1
            log.debug("wechat.transient", appid=grant.appid, openid=grant.openid,
                      endpoint=e.endpoint, errcode=e.errcode, detail=e.detail)
            if p.stage == "profile":
                self._profile_failed(p, kind, counts)
            else:
                p.grant = after_transient(p.grant, kind, self.clock(), rng=self.rng)
        except QuotaWait as e:
            result.quota_wait = e
            counts["quota_deferred"] += 1
            if not p.answered:
                return result  # nothing happened: give the lease back unchanged
            p.grant = after_transient(p.grant, "quota", self.clock(), not_before=e.until,
                                      count=False)
        except Stopped:
            if not p.answered:
                return result
        except StoreError as e:
            # The quota gate could not reach the database: the sweep says so once and ends.
            result.db_error = str(e)
            if not p.answered:
                return result
        except Exception:
            # A bug. What WeChat answered before it is still written below.
            log.exception("worker.failed", appid=grant.appid, openid=grant.openid)
            counts["worker_errors"] += 1
            if not p.answered:
                return result
        record, clear = p.record, p.clear
        if record is not None and record.reason != "refresh_token_expiring":
            clear = False
        result.write = GrantWrite(p.grant, schedule(p.grant, clock), p.profile, record, clear,
                                  base=(grant.access_token, grant.refresh_token), hold_s=hold_s)
        return result

    def _confirm(self, result: Result, clock: Lifetime) -> Result:
        """The grant's held answer outlived its hold (claims skip a held grant until then) and
        no earlier holder wrote newer tokens (a write clears the hold): it is recorded now,
        without asking WeChat again about tokens it has refused."""
        grant = result.grant
        dead, record = confirm_held(grant)
        result.counts["reauth_recorded"] += 1
        log.info("reauth.recorded", appid=grant.appid, openid=grant.openid,
                 reason=record.reason, errcode=record.errcode, held_since=record.since.isoformat())
        result.write = GrantWrite(dead, schedule(dead, clock), reauth=record,
                                  base=(grant.access_token, grant.refresh_token))
        return result
